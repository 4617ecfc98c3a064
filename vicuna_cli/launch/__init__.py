"""`vicuna launch`: SkyPilot recipes (recipes/*.yaml) started as managed jobs, SkyServe services
or clusters, estimated before they spend anything, or run on this machine with `--local`."""
