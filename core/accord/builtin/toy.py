"""Built-in plugin ``core``: a toy contrastive pipeline on generated data (the core demo)."""
from accord import hookimpl


@hookimpl
def plugin_info() -> dict[str, str]:
    return {"domain": "core", "description": "toy contrastive pretraining + linear probe demo"}
