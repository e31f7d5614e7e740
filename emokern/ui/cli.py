"""``emokern ui``: start the local page (see :mod:`emokern.ui`). Arguments and the run function; ``emokern.cli`` only
registers them (this module imports nothing heavy at import, so ``emokern --help`` stays fast)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["DEFAULT_BANK", "add_arguments", "load_backend", "run"]

DEFAULT_BANK = "emokern_out/bank/smollm2-135m-instruct.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bank", default=DEFAULT_BANK,
                        help=f"the VectorBank (NAME.json; default {DEFAULT_BANK}, written by `make demo`)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", default=None,
                       help="a model to load here (an embedded name, a Hugging Face directory or a .gguf; default: "
                            "the bank's model, else the embedded SmolLM2-135M-Instruct); with --vllm: the served "
                            "model's directory, for its tokenizer")
    where.add_argument("--vllm", metavar="URL", default=None,
                       help="use a running vLLM server with the emokern plugin instead (e.g. http://127.0.0.1:8000)")
    parser.add_argument("--tokenizer", default=None, help="with --vllm: where to read the tokenizer (default: the "
                                                          "served model's name, when it is a local directory)")
    parser.add_argument("--vllm-layers", default=None,
                        help="with --vllm: the layers the server has the op at (its EMOKERN_VLLM_LAYERS; default: the "
                             "bank's two-thirds layer, the plugin's default)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="model dtype for the local model (default bfloat16)")
    parser.add_argument("--readout-layer", type=int, default=None,
                        help="the layer read for colours and the chart (default: the bank's validated layer)")
    parser.add_argument("--steer-layer", type=int, default=None,
                        help="the page's default steering layer (default: the bank's two-thirds layer)")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _bank_path(path: str) -> Path:
    p = Path(path)
    json_path = p if p.suffix == ".json" else p.with_suffix(".json")
    if not json_path.exists():
        hint = (" Build it with `make demo` (or `emokern extract`), or pass --bank PATH." if path == DEFAULT_BANK
                else " Pass --bank with the .json of a bank written by `emokern extract` or `make demo`.")
        raise FileNotFoundError(f"no bank at {json_path}.{hint}")
    return json_path


def load_backend(args: argparse.Namespace):
    """The backend ``args`` ask for (loads the bank, and the model or the vLLM server's description)."""
    import torch

    from emokern.core.bank import VectorBank
    from emokern.ui.requests import Limits

    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)
    bank_path = _bank_path(args.bank)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vllm:
        from emokern.ui.vllm_backend import VLLMBackend

        bank = VectorBank.load(bank_path)
        layers = None
        if args.vllm_layers:
            layers = [int(x) for x in args.vllm_layers.split(",") if x.strip()]
        return VLLMBackend.connect(args.vllm, bank, tokenizer=args.tokenizer or args.model, layers=layers,
                                   limits=limits, bank_path=str(bank_path))
    from emokern.core.models import load_model
    from emokern.ui.backends import HFBackend

    bank = VectorBank.load(bank_path)
    name = args.model or bank.model_id or "smollm2-135m-instruct"
    model, tok = load_model(name, dtype=getattr(torch, args.dtype))
    bank.check_model(model)
    return HFBackend(model, tok, bank, readout_layer=args.readout_layer, steer_layer=args.steer_layer,
                     limits=limits, model_name=str(name), bank_path=str(bank_path))


def run(args: argparse.Namespace) -> int:
    """Load the backend, then serve the page until interrupted. Prints the address once it is listening."""
    import uvicorn

    from emokern.ui.app import create_app

    t0 = time.perf_counter()
    backend = load_backend(args)
    app = create_app(backend)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)

    async def announce():  # once the socket listens: the address and the start-up time
        import asyncio

        while not server.started:
            await asyncio.sleep(0.02)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"emokern ui: http://{shown}:{port}/ ({backend.kind} backend, {backend.model_name}; ready in "
                      f"{time.perf_counter() - t0:.1f} s; Ctrl+C stops)", flush=True)

    import asyncio

    async def main():
        task = asyncio.create_task(announce())
        await server.serve()
        task.cancel()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    if os.environ.get("EMOKERN_UI_QUIET") != "1":
        print("emokern ui: stopped", file=sys.stderr)
    return 0
