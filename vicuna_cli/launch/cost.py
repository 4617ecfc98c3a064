"""What a recipe will cost: node-hours x the hourly price of its accelerators, spot and on demand.

    cost = hours x nodes (x replicas for a service) x (host VM + accelerators) USD/hour

Prices come from SkyPilot's own GCP catalog when a copy is on this machine (SkyPilot downloads
it from GitHub on first use), else from `prices.json` shipped beside this file, which says where
and when its figures were taken. The rule is the same for both: the cheapest zone, separately
for spot and on-demand, as SkyPilot's optimizer chooses."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from .recipe import Recipe


@dataclass
class Price:
    spot: float  # USD per node-hour
    on_demand: float
    spot_zone: str
    on_demand_zone: str
    instance_type: str
    source: str
    date: str


@dataclass
class Line:
    accelerators: str  # "A100-80GB:8"
    nodes: int  # nodes x replicas
    hours: float | None
    price: Price | None

    def total(self, spot: bool) -> float | None:
        if self.price is None or self.hours is None:
            return None
        return self.hours * self.nodes * (self.price.spot if spot else self.price.on_demand)


@dataclass
class Estimate:
    lines: list[Line]
    use_spot: bool
    hours: float | None
    formula: str = "hours x nodes x (host VM + accelerators) USD/hour, cheapest zone"


def table() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("prices.json").read_text(encoding="utf-8"))


def catalog_file() -> Path:
    """SkyPilot's cached GCP catalog (present once SkyPilot has downloaded it on this machine)."""
    from sky.clouds.service_catalog import constants

    return Path(os.path.expanduser(constants.CATALOG_DIR)) / constants.CATALOG_SCHEMA_VERSION / "gcp" / "vms.csv"


def _from_catalog(path: Path, accelerator: str, count: int, instance_type: str) -> Price | None:
    """The cheapest zone's host + accelerator price, for spot and on demand, from the catalog CSV."""
    hosts: dict[str, tuple[float, float]] = {}
    gpus: dict[str, tuple[float, float]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                prices = (float(row["Price"] or "nan"), float(row["SpotPrice"] or "nan"))
            except (KeyError, ValueError):
                continue
            if row.get("InstanceType") == instance_type and not row.get("AcceleratorName"):
                hosts[row["AvailabilityZone"]] = prices
            elif (not row.get("InstanceType") and row.get("AcceleratorName") == accelerator
                  and row.get("AcceleratorCount") and float(row["AcceleratorCount"]) == count):
                gpus[row["AvailabilityZone"]] = prices
    totals = {zone: (hosts[zone][0] + gpus[zone][0], hosts[zone][1] + gpus[zone][1]) for zone in hosts.keys() & gpus}
    on_demand = {z: p[0] for z, p in totals.items() if p[0] > 0 and not math.isnan(p[0])}
    spot = {z: p[1] for z, p in totals.items() if p[1] > 0 and not math.isnan(p[1])}
    if not on_demand or not spot:
        return None
    od_zone, spot_zone = min(on_demand, key=on_demand.get), min(spot, key=spot.get)
    fetched = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).date().isoformat()
    return Price(spot[spot_zone], on_demand[od_zone], spot_zone, od_zone, instance_type,
                 f"SkyPilot catalog {path}", fetched)


def price(accelerator: str, count: int) -> Price | None:
    """The price of one node with `count` x `accelerator`, or None when nothing lists it."""
    shipped = table()
    entry = shipped["prices"].get(f"{accelerator}:{count}")
    if entry is None:
        return None
    path = catalog_file()
    if path.is_file():
        live = _from_catalog(path, accelerator, count, entry["instance_type"])
        if live is not None:
            return live
    od, spot = entry["on_demand"], entry["spot"]
    return Price(round(spot["instance"] + spot["accelerators"], 5), round(od["instance"] + od["accelerators"], 5),
                 spot["zone"], od["zone"], entry["instance_type"], shipped["source"], shipped["date"])


def estimate(recipe: Recipe, hours: float | None = None) -> Estimate:
    hours = hours if hours is not None else recipe.hours
    task = recipe.task
    nodes = task.num_nodes or 1
    if recipe.kind == "service" and task.service is not None:
        nodes *= max(1, getattr(task.service, "min_replicas", 1) or 1)
    lines = []
    for accelerators in recipe.accelerators():
        for name, count in accelerators.items():
            lines.append(Line(f"{name}:{count}", nodes, hours, price(name, int(count))))
    use_spot = any(r.use_spot for r in task.resources)
    # Cheapest first: it is the one SkyPilot's optimizer would choose.
    lines.sort(key=lambda line: (line.price is None, line.price.spot if line.price else 0.0))
    return Estimate(lines, use_spot, hours)
