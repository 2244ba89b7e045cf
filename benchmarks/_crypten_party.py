"""One CrypTen 0.4.1 role for `peer_crypten.py`; runs in the CrypTen venv, never in privmed's.

    python _crypten_party.py --probe
    python _crypten_party.py --role model-owner|data-owner|ttp --model M.onnx --input X.npy \
        --rendezvous file:///tmp/... --stats out.json [--output Y.npy] [--threads 1]

Roles map onto CrypTen ranks as: model owner = rank 0 (encrypts the weights), data owner =
rank 1 (encrypts the image, receives the output), trusted third party = rank 2 (CrypTen's
``TTPServer``, which hands out Beaver triples and other correlations on request; CrypTen calls
its TTP a *trusted* party, like privmed's dealer). Transport is torch.distributed's gloo
backend over TCP on loopback, which CrypTen uses unencrypted: privmed's figures include TLS.

The data owner also loads the model file, because CrypTen builds the network structure from it
on every party; ``model.encrypt(src=0)`` then replaces every weight with shares of the model
owner's values, so the data owner's copy of the weights is never used.

Two workarounds make CrypTen 0.4.1 run at all under torch 2.13 (see `peer_crypten.py`):
``torch.onnx._internal.registration`` is stubbed before ``import crypten`` (only CrypTen's
PyTorch-export path uses it; we load ONNX), and the ONNX copy it loads has no Identity nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import types
from pathlib import Path
from typing import Any

RANKS = {"model-owner": 0, "data-owner": 1, "ttp": 2}


def stub_torch_onnx_registration() -> None:
    """Insert an empty ``torch.onnx._internal.registration`` so CrypTen 0.4.1 imports.

    CrypTen's onnx_converter does ``from torch.onnx._internal.registration import registry``
    when ``torch.onnx.symbolic_registry`` is missing; torch 2.13 has neither. ``registry`` is
    read only by ``_update_onnx_symbolic_registry``, i.e. by ``crypten.nn.from_pytorch``, which
    this benchmark never calls, so ``None`` is a safe stand-in.
    """
    name = "torch.onnx._internal.registration"
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.registry = None  # type: ignore[attr-defined]
        sys.modules[name] = stub


def main() -> None:
    if sys.argv[1:] == ["--probe"]:  # does CrypTen import in this venv? (exit status says)
        stub_torch_onnx_registration()
        import crypten  # noqa: F401
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=sorted(RANKS), required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--rendezvous", required=True)
    ap.add_argument("--stats", type=Path, required=True)
    ap.add_argument("--output", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t_start = time.perf_counter()

    os.environ.update({"RANK": str(RANKS[args.role]), "WORLD_SIZE": "2",
                       "RENDEZVOUS": args.rendezvous, "DISTRIBUTED_BACKEND": "gloo"})
    stub_torch_onnx_registration()
    import crypten
    import crypten.communicator as comm
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    crypten.cfg.mpc.provider = "TTP"  # two parties + trusted third party
    crypten.cfg.communicator.verbose = True  # CrypTen counts rounds and bytes only when verbose
    t_import = time.perf_counter() - t_start
    stats: dict[str, Any] = {"role": args.role, "rank": RANKS[args.role], "threads": args.threads,
                             "import_s": round(t_import, 3)}

    if args.role == "ttp":
        # TTPServer calls crypten.init() itself and serves until rank 0 sends "terminate"
        crypten.mpc.provider.TTPServer()
        stats["comm"] = comm.get().get_communication_stats() if comm.is_initialized() else None
    else:
        t = time.perf_counter()
        crypten.init()
        stats["init_s"] = round(time.perf_counter() - t, 3)
        x_plain = np.load(args.input)
        t = time.perf_counter()
        with open(args.model, "rb") as f:  # from_onnx takes a file object or bytes, not a path
            model = crypten.nn.from_onnx(f)
        model.encrypt(src=RANKS["model-owner"])
        model.eval()
        x = torch.from_numpy(x_plain) if args.role == "data-owner" else torch.empty(x_plain.shape)
        x_enc = crypten.cryptensor(x, src=RANKS["data-owner"])
        stats["setup_s"] = round(time.perf_counter() - t, 3)  # model load + weight and input sharing
        comm_setup = dict(comm.get().get_communication_stats())
        t = time.perf_counter()
        with crypten.no_grad():
            y_enc = model(x_enc)
        y = y_enc.get_plain_text(dst=RANKS["data-owner"])
        stats["online_s"] = round(time.perf_counter() - t, 3)  # forward pass + output reveal
        stats["comm"] = dict(comm.get().get_communication_stats())
        stats["comm_setup"] = comm_setup
        if args.role == "data-owner" and args.output is not None:
            np.save(args.output, y.numpy().astype(np.float32))
        crypten.uninit()  # rank 0 sends "terminate" to the TTP
    stats["wall_s"] = round(time.perf_counter() - t_start, 3)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    stats["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 3)
    stats["peak_rss_mb"] = round(ru.ru_maxrss / 1024, 1)
    args.stats.write_text(json.dumps(stats))


if __name__ == "__main__":
    main()
