"""The fast backend of the training loss: a one-layer model on a sparse batch, backward written out.

Only the seam (`cis_lightning.backends`) imports this package; the core (models, task, evaluation)
knows nothing of it, and deleting it leaves the reference backend (autograd through the network's
own `forward`) in charge everywhere.

- `loss`: the loss as one autograd node (`one_layer_form`, `mean_loss`, `one_layer_loss`) and the
  grouping of a batch's entries that it runs on, in torch and numpy.
- `kernels`: the same host grouping compiled by numba, used where numba is installed (CIS_NUMBA=0 in
  the environment turns it off; the numpy form gives the same arrays bit for bit), and the labels'
  norms of a batch mean against a fixed mixing from the pairs of entries in each row.
"""

from cis_lightning.fastpath.loss import mean_loss, one_layer_form, one_layer_loss

__all__ = ["mean_loss", "one_layer_form", "one_layer_loss"]
