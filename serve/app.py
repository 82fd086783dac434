"""The Ray Serve application, for `serve run` / `serve deploy` (same as `msit serve`).

    serve run serve/config.yaml
    serve run serve.app:build model=runs/demo/model data=runs/demo/prepared

`build` is msit's application builder: one autoscaling deployment of the scorer behind the HTTP API.
"""

from msit.serving.deployment import build

__all__ = ["build"]
