"""`python -m dermanet.serving --port 8123`: the Serve app on a chosen host/port, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading

from dermanet.serving.runner import DEFAULT_HOST, DEFAULT_PORT, start_local, stop_local
from dermanet.serving.settings import ServeSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve DermaNet (classify + Grad-CAM) over HTTP.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default 8000)")
    parser.add_argument(
        "--model-dir", help="registry folder (default $DERMANET_MODEL_DIR, weights/)"
    )
    parser.add_argument("--default-model", help="default model id (default: see the registry)")
    parser.add_argument("--max-batch-size", type=int, help="@serve.batch size; 1 disables batching")
    parser.add_argument("--num-cpus", type=float, help="logical CPUs for the private Ray")
    args = parser.parse_args(argv)
    overrides = {
        key: value
        for key, value in {
            "model_dir": args.model_dir,
            "default_model": args.default_model,
            "max_batch_size": args.max_batch_size,
        }.items()
        if value is not None
    }
    settings = ServeSettings.from_mapping(overrides, base=ServeSettings.from_env())
    url = start_local(settings, host=args.host, port=args.port, num_cpus=args.num_cpus)
    print(f"DermaNet serving at {url} (docs: {url}/docs); Ctrl-C stops it")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    stop_local()


if __name__ == "__main__":
    main()
