"""What the trainer minimises: the one interface between a model and the training loop."""

import abc
from collections.abc import Mapping
from typing import Any

import equinox as eqx
from jaxtyping import Array, Float

from .._types import Key


class AbstractObjective(eqx.Module):
    """A training objective: per-example loss sums and counts of a model on a batch.

    The trainer knows nothing of the model it trains; it differentiates this objective.
    The loss of a step is `sum(total) / sum(count)` over the whole global batch (every
    micro-batch of gradient accumulation included), so a loss that averages over a varying
    number of target positions per example is the same mean however the batch is split.

    A subclass implements `loss_terms`; it may hold static settings (a compute dtype, loss
    weights) as fields. For example, least squares on a model that maps `x` to `y`:

    ```python
    class LeastSquares(fluid.train.AbstractObjective):
        def loss_terms(self, model, batch, keys):
            error = jax.vmap(model)(batch["x"]) - batch["y"]
            return jnp.sum(error**2, axis=-1), jnp.ones(error.shape[0])
    ```
    """

    @abc.abstractmethod
    def loss_terms(
        self, model: Any, batch: Mapping[str, Array], keys: Key
    ) -> tuple[Float[Array, " batch"], Float[Array, " batch"]]:
        """The summed loss of each example and the number of terms in each sum.

        **Arguments:**

        - `model`: the model being trained (trainable and frozen leaves combined).
        - `batch`: a dict of arrays whose leading axis is the batch, as the loader yields.
        - `keys`: one PRNG key per example (dropout, masks, noise).

        **Returns:**

        `(total, count)`, each `Float[batch]`.
        """


class ModelLossTerms(AbstractObjective):
    """The model's own `loss_terms(batch, keys=keys)`: for models that define their loss
    (`fluid.FluidModel`, `fluid.tokenizers.AutoencoderObjective`)."""

    def loss_terms(self, model, batch, keys):
        return model.loss_terms(batch, keys=keys)
