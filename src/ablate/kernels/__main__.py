"""`python -m ablate.kernels`: the capability table, what runs here, and what auto picks."""
from __future__ import annotations

import argparse

import torch

from ablate.kernels import BACKENDS, KernelRefused, get_backend, select_backend, standard_cells
from ablate.kernels.select import DEFAULT_DTYPES, capability_table, format_table


def auto_picks(device: str, head_dim: int) -> list[str]:
    lines = []
    for backward in (True, False):
        cells = standard_cells(device, DEFAULT_DTYPES[device], head_dim, backward)
        for name, cell in cells.items():
            try:
                pick = select_backend(cell, "auto").name
            except KernelRefused as err:
                pick = f"none ({err})"
            lines.append(f"  {name:<14} {'fwd+bwd' if backward else 'fwd':<8} -> {pick}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ablate.kernels", description=__doc__)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)

    print(f"Attention backends (head_dim={args.head_dim}):\n")
    print(format_table(capability_table(head_dim=args.head_dim)))
    print("\nAvailable here:")
    for name in BACKENDS.names():
        why = get_backend(name).unavailable()
        print(f"  {name:<10} {'yes' if why is None else 'no: ' + why}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"\nAuto picks on {device} ({str(DEFAULT_DTYPES[device]).replace('torch.', '')}):")
        print("\n".join(auto_picks(device, args.head_dim)))


if __name__ == "__main__":
    main()
