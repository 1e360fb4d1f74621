"""The fast backend of the training loss: a one-layer model on a sparse batch, backward written out.

Only the seam (`cis_lightning.backends`) imports this package; the core (models, task, evaluation)
knows nothing of it, and deleting it leaves the reference backend (autograd through the network's
own `forward`) in charge everywhere.

- `loss`: the loss as one autograd node (`one_layer_form`, `mean_loss`, `one_layer_loss`) and the
  grouping of a batch's entries that it runs on, in torch and numpy.
- `kernels`: the same host grouping compiled by numba, used where numba is installed (CIS_NUMBA=0 in
  the environment turns it off); the numpy form gives the same arrays bit for bit.
"""

# Device types where `one_layer_loss` prepares its entries on the host: it drops empty samples (it
# reads their count, which on a GPU would be a sync) and groups the entries with numpy or numba.
# `loss` reads it from here at every call, so that one assignment switches it.
HOST_PATH_ON = ("cpu",)

from cis_lightning.fastpath.loss import (  # noqa: E402 (HOST_PATH_ON first: loss reads it from here)
    _Entries,
    drop_empty_rows,
    mean_loss,
    one_layer_form,
    one_layer_loss,
)

__all__ = ["HOST_PATH_ON", "_Entries", "drop_empty_rows", "mean_loss", "one_layer_form", "one_layer_loss"]
