"""A layer-by-layer table of a model, for logging beside a run."""

import copy

from torch import nn


def summary(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> str:
    """torchinfo's table (output size and parameter count of every layer) as text.

    torchinfo moves the model it is given to its device, so it is handed a copy: asking
    for the summary of a model being trained on a GPU must not move that model to the CPU.
    The forward pass runs in eval mode, so BatchNorm running statistics are not touched.
    """
    # Imported here: the served model imports cifar_models but never needs a summary.
    from torchinfo import summary as torchinfo_summary

    stats = torchinfo_summary(
        copy.deepcopy(model),
        input_size=input_size,
        col_names=("output_size", "num_params"),
        depth=8,  # deep enough that every conv, norm and activation gets its own row
        device="cpu",
        mode="eval",
        verbose=0,
    )
    return str(stats)
