"""Shared pieces of the command line: output, argument groups, loaders (no commands here)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_UNCONVERGED",
    "AddCommand",
    "Parser",
    "allow_unconverged_arg",
    "bit_width",
    "bits_arg",
    "certificate_rows",
    "data_args",
    "emit",
    "granularity_arg",
    "load_W",
    "load_data",
    "positive_float",
    "positive_int",
    "renamed_flag",
    "require_checkpoint",
    "require_deployment",
    "solver_args",
    "step_rule_arg",
    "unconverged_status",
]

#: ``add(name, func, help, epilog="") -> parser``: how a command family registers its commands.
AddCommand = Callable[..., argparse.ArgumentParser]


#: Exit status of ``eval`` and ``run`` when some solve hit its cap or did not settle (the results
#: are still printed); ``--allow-unconverged`` turns it back into 0.
EXIT_UNCONVERGED = 3


def unconverged_status(args: argparse.Namespace, count: int, what: str) -> int:
    """``0``, or :data:`EXIT_UNCONVERGED` with an ``error:`` line on stderr when ``count > 0``."""
    import sys

    if count and not getattr(args, "allow_unconverged", False):
        print(
            f"monquant {args.command}: error: {count} {what} (exit status {EXIT_UNCONVERGED}; "
            "--allow-unconverged to accept)",
            file=sys.stderr,
        )
        return EXIT_UNCONVERGED
    return 0


def allow_unconverged_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-unconverged",
        action="store_true",
        help=f"exit 0 even if some solve did not converge (default: exit {EXIT_UNCONVERGED})",
    )


class Parser(argparse.ArgumentParser):
    """An argument parser whose error output starts with the ``error:`` line (usage after it)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n{self.format_usage()}")


def positive_int(text: str) -> int:
    """argparse type: a whole number ``>= 1`` (checked before any data loads)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v}")
    return v


def check_interval(text: str) -> int | str:
    """argparse type of ``--check-every``: a whole number ``>= 1`` or ``auto``."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'auto', got {text!r}") from None


def positive_float(text: str) -> float:
    """argparse type: a finite number ``> 0``."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def quant_parts(text: str) -> tuple[str, ...]:
    """argparse type: a comma list of the tensors to quantize, among ``W``, ``U``, ``b``."""
    parts = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [p for p in parts if p not in ("W", "U", "b")]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"expected a comma list of W, U, b, got {text!r}")
    return parts


def device_name(text: str) -> str:
    """argparse type: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (checked without torch;
    availability is checked when the command starts)."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or auto, got {text!r}")
    return text


def thread_count(text: str) -> str | int:
    """argparse type: ``auto`` or a positive number of intra-op threads."""
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}")
    return v


def select_device(name: str) -> str:
    """Resolve ``--device`` and make it torch's default device (``cpu``: nothing changes).

    ``auto`` is ``cuda`` when a GPU is available, else ``cpu``. Data and checkpoints are loaded
    onto the default device (:func:`load_data`, ``load_model``), and library code follows the
    device of its inputs, so the whole command runs there."""
    if name == "cpu":
        return name
    import torch

    from monquant.errors import ConfigError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available on this machine")
    if name != "cpu":
        torch.set_default_device(name)
    return name


def bit_width(text: str) -> int:
    """argparse type: a weight bit-width in the quantizer's range ``[MIN_BITS, MAX_BITS]``."""
    from monquant.names import MAX_BITS, MIN_BITS

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit-width, got {text!r}") from None
    if not MIN_BITS <= v <= MAX_BITS:
        raise argparse.ArgumentTypeError(f"a bit-width is in [{MIN_BITS}, {MAX_BITS}], got {v}")
    return v


def bits_arg(
    p: argparse.ArgumentParser,
    *,
    many: bool,
    help_: str,
    default: Any = None,
    required: bool = False,
    flag: str = "--bits",
    kind: Callable[[str], int] = bit_width,
) -> None:
    """The one ``--bits`` convention (docs/cli.md): a command that writes one model takes one
    value (``--bits B``); a command that sweeps takes one or more (``--bits B [B ...]``), never
    zero."""
    p.add_argument(
        flag,
        type=kind,
        nargs="+" if many else None,
        default=default,
        required=required,
        metavar="B",
        help=help_,
    )


class _Renamed(argparse.Action):
    """A flag that was renamed: warn and store into the new flag's ``dest`` (``keep``), or refuse."""

    def __init__(self, option_strings, dest, new: str = "", keep: bool = True, note: str = "",
                 **kw):  # fmt: skip
        self.new, self.keep, self.note = new, keep, note
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        if not self.keep:
            parser.error(f"{option_string} was renamed {self.new}{self.note}")
        # printed by main after the command (an error line, if any, stays the first line)
        notes = list(getattr(namespace, "_deprecations", []))
        notes.append(f"{parser.prog}: warning: {option_string} is now {self.new}")
        namespace._deprecations = notes
        setattr(namespace, self.dest, values)


def renamed_flag(
    p: argparse.ArgumentParser | Any,
    old: str,
    new: str,
    dest: str,
    keep: bool = True,
    note: str = "",
    **kw: Any,
) -> None:
    """Accept ``old`` as a hidden alias of ``new`` with a warning (``keep``), or refuse it with a
    one-line error naming ``new`` (when the old name meant something else elsewhere)."""
    p.add_argument(old, dest=dest, action=_Renamed, new=new, keep=keep, note=note,
                   help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw)  # fmt: skip


def require_checkpoint(path: str, command: str):
    """The :class:`~monquant.storage.checkpoints.LoadedModel` at ``path``, loaded before any data.

    The whole file is read and verified here (digest, config, finite weights), so a corrupt or
    tampered checkpoint is named before MNIST is looked for; callers use what it returns.
    """
    from monquant.errors import CheckpointError
    from monquant.storage.checkpoints import architecture, load_model
    from monquant.storage.tensors import is_monquant_file

    p = Path(path)
    ok = p.suffix == ".safetensors" and p.is_file() and is_monquant_file(p)
    if not ok:
        raise CheckpointError(
            f"{p}: {command} takes a monquant model checkpoint (.safetensors written by "
            "'monquant train' or 'monquant ptq'); a bare weight file (.npz or plain "
            "safetensors holding W) goes to 'monquant certify'"
            + ("" if p.exists() else " (no such file)")
        )
    loaded = load_model(p)
    if architecture(loaded.model) == "multitier" and command not in ("eval", "ptq"):
        raise CheckpointError(f"{p}: {command} does not take multi-tier checkpoints yet; "
                              "'monquant eval', 'ptq' and 'certify' do (and the library's "
                              "monquant.quantize_ on nn.MultiTierMonDEQ)")  # fmt: skip
    return loaded


def require_deployment(path: str, command: str) -> None:
    """Refuse anything but a monquant file for ``run`` (the deployment kind is checked on load)."""
    from monquant.errors import CheckpointError
    from monquant.storage.tensors import is_monquant_file

    p = Path(path)
    if not (p.suffix == ".safetensors" and p.is_file() and is_monquant_file(p)):
        raise CheckpointError(
            f"{p}: {command} takes an integer deployment file (.safetensors written by "
            "'monquant export')" + ("" if p.exists() else " (no such file)")
        )


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    from monquant.storage.jsonio import dumps_json

    if getattr(args, "json", False):
        print(dumps_json(data))
    else:
        print(text)


def solver_args(p: argparse.ArgumentParser) -> None:
    from monquant.names import SPLITTING_METHODS

    g = p.add_argument_group("solver")
    g.add_argument("--solver", choices=SPLITTING_METHODS, default="pr", help="splitting method")
    g.add_argument("--tol", type=positive_float, default=1e-4, help="relative residual tolerance")
    g.add_argument(
        "--max-iter", type=positive_int, default=2000, help="iteration cap (reported if hit)"
    )
    g.add_argument(
        "--step", type=positive_float, default=None, help="step size (default: FB m/L^2, PR 1/L)"
    )
    g.add_argument(
        "--anderson", type=int, default=0, metavar="M",
        help="safeguarded Anderson acceleration with memory M (0: plain iteration; see docs/theory.md)",
    )  # fmt: skip
    g.add_argument(
        "--check-every", type=check_interval, default="auto", metavar="K|auto",
        help="test the residual at iterations predicted from its decay (auto, the default; a training "
             "solve tests first at 9/10 of the previous batch's iterations), or every K-th iteration "
             "(1: every one, the exact first iteration that meets the tolerance; README: Benchmarks)",
    )  # fmt: skip


def granularity_arg(p: argparse.ArgumentParser, flag: str = "--granularity") -> None:
    """``--granularity`` with the quantizer's own vocabulary (``quant.uniform.GRANULARITIES``)."""
    from monquant.names import GRANULARITIES

    p.add_argument(
        flag, choices=GRANULARITIES, default="per-tensor", help="scale per tensor or per row"
    )


def step_rule_arg(p: argparse.ArgumentParser) -> None:
    """``--step-rule paper|narrow`` (``monquant.names.STEP_RULES``)."""
    from monquant.names import STEP_RULES

    p.add_argument(
        "--step-rule",
        choices=STEP_RULES,
        default="paper",
        help="quantizer step: paper 2 w_max/(2^b - 1) (the paper's text) or narrow "
        "w_max/(2^(b-1) - 1) (the paper's code, torch.ao, TensorRT)",
    )


def executor_args(p: argparse.ArgumentParser) -> None:
    """``--executor serial|process|ray``, ``--workers N``, ``--address ADDR`` (sweeps)."""
    from monquant.names import EXECUTORS

    g = p.add_argument_group("executor")
    g.add_argument("--executor", choices=EXECUTORS, default="serial",
                   help="where the independent trainings run: here, in local worker processes, "
                   "or on Ray (pip install monquant[ray])")  # fmt: skip
    g.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes / Ray CPUs (default: the available cores)")  # fmt: skip
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: start a local Ray for the run)")  # fmt: skip


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the MNIST IDX files (else $MONQUANT_DATA, the cache, or a download)",
    )
    p.add_argument("--no-download", action="store_true", help="never download MNIST")


def load_data(args: argparse.Namespace):
    """MNIST as the data arguments say, on the command's device (``--device``)."""
    import torch

    from monquant.data import load_mnist

    data = load_mnist(args.data_dir, download=not args.no_download)
    device = torch.get_default_device()
    return data if device.type == "cpu" else data.to(device)


def load_kernel(path: str):
    """The 4-D convolution kernel ``W`` (``c x c x kh x kw``) of a plain weights file."""
    from monquant.errors import CheckpointError
    from monquant.storage.tensors import load_weight_file

    p = Path(path)
    weights = load_weight_file(p)
    if "W" not in weights:
        raise CheckpointError(f"{p}: no tensor named 'W' (found: {', '.join(sorted(weights))})")
    W = weights["W"]
    if W.dim() != 4:
        raise CheckpointError(f"{p}: --image-size certifies a convolution kernel W of shape "
                              f"(c, c, kh, kw); this W has shape {tuple(W.shape)}")  # fmt: skip
    if W.is_complex() or not W.is_floating_point():
        raise CheckpointError(f"{p}: W has dtype {W.dtype}; a kernel is real floating point")
    return W.double()


def load_W(path: str):
    """``W`` (and the model, if any) from a checkpoint or a plain weights file (a multi-tier
    checkpoint gives its float operator)."""
    import torch

    from monquant.errors import CheckpointError
    from monquant.operators import check_weight
    from monquant.storage.checkpoints import load_model
    from monquant.storage.tensors import is_monquant_file, load_weight_file

    p = Path(path)
    if p.suffix == ".safetensors" and is_monquant_file(p):
        try:
            loaded = load_model(p)  # a dense W, a conv model's composite kernel, or an operator
            ref = loaded.model.layer.reference_weight()
            return (ref.double() if isinstance(ref, torch.Tensor) else ref), loaded
        except CheckpointError as exc:
            if "not a monquant model checkpoint" not in str(exc):
                raise
    weights = load_weight_file(p)
    if "W" not in weights:
        raise CheckpointError(f"{p}: no tensor named 'W' (found: {', '.join(sorted(weights))})")
    W = weights["W"]
    if W.dim() == 4:
        raise CheckpointError(f"{p}: W has shape {tuple(W.shape)}, a convolution kernel: give "
                              "--image-size H W to certify it on an H x W state")  # fmt: skip
    if W.is_complex():
        raise CheckpointError(f"{p}: W is complex ({W.dtype}); a MonDEQ weight must be real")
    if not W.is_floating_point():
        raise CheckpointError(
            f"{p}: W has dtype {W.dtype}; a MonDEQ weight is real-valued floating point "
            "(save it as float32/float64, e.g. W.astype(np.float64), if the integers are meant)"
        )
    check_weight(W, f"{p.name}:W")
    return W.double(), None


def certificate_rows(certs) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the certificate table (see :data:`report.CERTIFICATE_COLUMNS`)."""
    from monquant.report import certificate_cells, certificate_headers

    extra = ("rho_fb_exact", "rho_pr_exact", "relative_displacement_bound")
    headers = certificate_headers(["rho_FB", "rho_PR", "rel.disp.bound"])
    return headers, [certificate_cells(c.to_dict(), extra) for c in certs]
