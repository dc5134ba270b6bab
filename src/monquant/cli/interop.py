"""``monquant import``: bring checkpoints of other MonDEQ code into monquant."""

from __future__ import annotations

import argparse

from monquant.cli.common import AddCommand, emit, positive_float

__all__ = ["cmd_import", "register"]

EPILOG_IMPORT = """layouts:
  mondeq-quant     the paper's code (JLi-Projects/mondeq-quant): mon.core.{A,S,m_raw,U,b},
                   classifier.{weight,bias}; m = softplus(m_raw) + 1e-4
  monotone-op-net  the original MonDEQ code (locuslab/monotone_op_net), fully connected:
                   [mon.linear_module.]{U.weight,U.bias,A.weight,B.weight}, Wout.{weight,bias};
                   the fixed margin is not in the file: --margin (default 1.0, MONSingleFc's;
                   SingleFcNet's default is 0.1, but the published mnist_fc_model_trained.pt
                   was trained with m = 1.0: 98.19% test accuracy with 1.0, 66.1% with 0.1)

examples:
  monquant import mondeq-quant mnist_mondeq_float.pt --out paper.safetensors
  monquant import monotone-op-net mnist_fc_model_trained.pt --out mon.safetensors
  monquant certify paper.safetensors --bits 3 4 5 6 8
"""


def cmd_import(args: argparse.Namespace) -> int:
    from monquant.storage.checkpoints import save_model
    from monquant.storage.files import check_output_file
    from monquant.storage.foreign import import_checkpoint
    from monquant.verified import spectral_bounds

    check_output_file(args.out)
    im = import_checkpoint(args.layout, args.source, args.margin)
    path = save_model(args.out, im.model, extra=im.metadata())
    W = im.model.layer.weight().detach().double()
    st = spectral_bounds(W)
    cfg = im.model.config
    info = {
        "out": str(path), "layout": args.layout, "source": args.source, "hidden": cfg.hidden,
        "in_features": cfg.in_features, "out_features": cfg.out_features,
        "rank": cfg.rank or cfg.hidden, "m": st.m, "m_lower": st.m_lo, "L": st.L,
        "L_upper": st.L_hi, "kappa": st.L / st.m if st.m > 0 else float("inf"),
        "w_max": float(W.abs().max()), "verdict": st.verdict, "notes": im.notes,
    }  # fmt: skip
    text = (
        f"imported {args.layout} {args.source} -> {path}\n"
        f"n = {cfg.hidden}, d = {cfg.in_features}, classes = {cfg.out_features}, "
        f"rank(A) = {info['rank']}; margin(W) = {st.m:.4g} (proved >= {st.m_lo:.4g}), "
        f"L = {st.L:.4g}, kappa = {info['kappa']:.3g}, w_max = {info['w_max']:.4g}\n"
        + "\n".join(f"note: {n}" for n in im.notes)
    )
    emit(args, info, text)
    return 0


def register(add: AddCommand) -> None:
    """Add ``import`` to the main parser."""
    from monquant.names import IMPORT_LAYOUTS

    p = add("import", cmd_import, "convert a checkpoint of other MonDEQ code into a monquant model",
            EPILOG_IMPORT)  # fmt: skip
    p.add_argument("layout", choices=IMPORT_LAYOUTS, help="the source code's checkpoint layout")
    p.add_argument("source", help="PyTorch state dict (.pt/.pth), read with weights_only=True")
    p.add_argument("--out", required=True, help="monquant model checkpoint to write (.safetensors)")
    p.add_argument("--margin", "--m", type=positive_float, default=None,
                   help="fixed margin m (monotone-op-net only; default 1.0)")  # fmt: skip
