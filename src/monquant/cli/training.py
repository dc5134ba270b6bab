"""``monquant train``: float and quantization-aware training on MNIST."""

from __future__ import annotations

import argparse
from pathlib import Path

from monquant.cli.common import (
    AddCommand,
    bits_arg,
    data_args,
    emit,
    granularity_arg,
    load_data,
    positive_float,
    positive_int,
    solver_args,
)

__all__ = ["cmd_train", "register"]

EPILOG_TRAIN = """examples:
  monquant train --out runs/float                 # the paper's setup (15 epochs, PR solver)
  monquant train --out runs/qat4 --qat-bits 4     # quantization-aware training at 4 bits
  monquant train --out runs/float --resume        # continue an interrupted run
  monquant train --out runs/fast --train-tol-start 1e-2   # loose early training solves, --tol at the end
  monquant train --out runs/lm4 --qat-bits 4 --margin-target 0.1 --robust-eps 0.1
  torchrun --nproc-per-node 2 -m monquant train --out runs/ddp   # data-parallel (gloo on CPU)
  monquant train --out runs/conv --arch conv --channels 16 --kernel 3 --margin-init 0.5
  monquant train --out runs/conv4 --arch conv --qat-bits 4 --granularity per-channel
  monquant train --out runs/tiers6 --arch multitier --qat-bits 6 --granularity per-channel
  monquant train --out runs/tiers --arch multitier --tier-channels 8 16 32 --margin-init 0.5
"""


def cmd_train(args: argparse.Namespace) -> int:
    from monquant.training import distributed as dist
    from monquant.training.runs import TrainRequest, run_training

    req = TrainRequest.of(
        Path(args.out),
        arch=args.arch,
        hidden=args.hidden,
        channels=args.channels,
        kernel=args.kernel,
        pool=args.pool,
        tier_channels=tuple(args.tier_channels),
        rank=args.rank,
        margin_init=args.margin_init,
        learn_margin=not args.fixed_margin,
        solver=dict(method=args.solver, tol=args.tol, max_iter=args.max_iter, step=args.step,
                    anderson=args.anderson, check_every=args.check_every),
        backward=args.backward,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        decay_epoch=args.decay_epoch,
        decay=args.decay,
        seed=args.seed,
        qat_bits=args.qat_bits,
        qat_granularity=args.granularity,
        margin_target=args.margin_target,
        margin_weight=args.margin_weight,
        robust_eps=args.robust_eps,
        train_tol_start=args.train_tol_start,
        resume=args.resume,
        progress=not args.no_progress,
    )
    data = load_data(args)
    dist.init_from_env()  # under torchrun: join the process group (gloo on CPU, NCCL on CUDA)
    result = run_training(req, data, echo=None if args.json or not dist.is_main() else print)
    if not dist.is_main():
        return 0  # rank 0 reports
    last = result["history"][-1]
    emit(
        args,
        result,
        f"trained {last['epoch']} epochs: test accuracy {last['test_accuracy']:.4f}, "
        f"m {last['m']:.4f}, L {last['L']:.4f}, kappa {last['kappa']:.2f}, "
        f"unconverged train/test solves {sum(h['train_unconverged'] for h in result['history'])}"
        f"/{last['test_unconverged']}\nmodel: {result['model']}\nlog: {result['log']}",
    )
    return 0


def register(add: AddCommand) -> None:
    """Add ``train`` to the main parser."""
    t = add("train", cmd_train, "train a MonDEQ on MNIST (float or QAT)", EPILOG_TRAIN)
    t.add_argument("--out", required=True, help="run folder (checkpoint, model, log)")
    t.add_argument("--arch", choices=["fc", "conv", "multitier"], default="fc",
                   help="fc: the paper's dense MonDEQ; conv: a single-convolution MonDEQ (W a "
                   "circular convolution, resolvent per 2-D frequency); multitier: tiers of "
                   "28x28, 14x14, 7x7 coupled by stride-2 convolutions")  # fmt: skip
    t.add_argument(
        "--hidden", type=positive_int, default=100, help="hidden units n of the MonDEQ layer (fc)"
    )
    t.add_argument("--channels", type=positive_int, default=16,
                   help="channels c of the equilibrium state (conv)")  # fmt: skip
    t.add_argument("--tier-channels", type=positive_int, nargs="+", default=[8, 16, 32],
                   metavar="C", help="channels of each tier (multitier; 2 or more tiers)")  # fmt: skip
    t.add_argument("--kernel", type=positive_int, default=3,
                   help="size k of the k x k factors A, B and of U (conv; odd)")  # fmt: skip
    t.add_argument("--pool", type=positive_int, default=4,
                   help="average pooling before the linear head (conv; divides 28)")  # fmt: skip
    t.add_argument("--rank", type=positive_int, default=None,
                   help="rank of A (default: full; conv: output channels of A)")  # fmt: skip
    t.add_argument(
        "--margin-init",
        type=positive_float,
        default=1.0,
        help="initial learnable margin m (W-K parameterization)",
    )
    t.add_argument("--fixed-margin", action="store_true", help="do not learn the margin")
    t.add_argument(
        "--backward",
        choices=["splitting", "direct"],
        default="splitting",
        help="implicit backward: splitting (Theorem 5) or a direct dense solve",
    )
    t.add_argument("--epochs", type=positive_int, default=15, help="training epochs")
    t.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    t.add_argument("--batch-size", type=positive_int, default=128, help="mini-batch size")
    t.add_argument(
        "--decay-epoch",
        type=positive_int,
        default=10,
        help="epoch at which the learning rate is multiplied by --decay",
    )
    t.add_argument(
        "--decay", type=positive_float, default=0.1, help="learning-rate decay factor in (0, 1]"
    )
    t.add_argument("--seed", type=int, default=0, help="random seed (initialization and batches)")
    t.add_argument(
        "--train-tol-start", type=positive_float, default=None, metavar="T",
        help="the first epoch's training solves stop at relative residual T, tightening "
             "geometrically to --tol at the last epoch; evaluation, the saved model and certificates "
             "always use --tol (default: every training solve at --tol)",
    )  # fmt: skip
    bits_arg(t, many=False, flag="--qat-bits", help_="quantization-aware training at B bits")
    granularity_arg(t)
    t.add_argument("--margin-target", type=float, default=None, help="margin-aware QAT target")
    t.add_argument(
        "--margin-weight", type=float, default=1.0, help="weight of the margin-aware penalty"
    )
    t.add_argument(
        "--robust-eps",
        type=positive_float,
        default=None,
        metavar="EPS",
        help="Lipschitz-margin training: raise the certified L2 radius toward EPS (normalised "
        "input space; with --qat-bits, of the quantized model)",
    )
    t.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    solver_args(t)
    data_args(t)
