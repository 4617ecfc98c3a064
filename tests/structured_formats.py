"""The response_format the structured-output tests share (core tests and the live server's)."""

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["A", "B", "tie"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
    },
    "required": ["verdict", "score"],
    "additionalProperties": False,
}
VERDICT_FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}}
