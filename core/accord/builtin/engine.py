"""Built-in plugin ``engine``: the core's losses, matchers and the engine benchmark."""
from accord import hookimpl


@hookimpl
def plugin_info() -> dict[str, str]:
    return {"domain": "core", "description": "contrastive losses, matchers, tiled InfoNCE"}
