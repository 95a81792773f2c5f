import abc

import equinox as eqx
from jaxtyping import Array, Float

from .._types import Condition, Key, Scalar, Token


class AbstractOutputHead(eqx.Module):
    """Turns one condition vector into a loss against a target token, or into a sample.

    A head works on ONE position; `FluidModel` vmaps it over positions and examples, so the
    head's network is evaluated as one batch over every position of a step.

    `token_kind` declares the tokens the head accepts (`"continuous"`: a target is a
    `Float[Array, " token_dim"]`; `"discrete"`: an `Int[Array, ""]` code). `cond_dim` is
    the width of the condition vector the head expects (the backbone's `dim`).

    Classifier-free guidance is the head's business: `sample` receives the conditional and
    the unconditional condition vectors and combines them its own way (logits for a softmax,
    noise predictions for a diffusion head). With `cfg == 1` the result must equal sampling
    from the conditional vector alone.
    """

    token_kind: eqx.AbstractClassVar[str]
    cond_dim: eqx.AbstractVar[int]

    @abc.abstractmethod
    def loss(self, z: Condition, target: Token, *, key: Key) -> Scalar:
        """Training loss of one position.

        **Arguments:**

        - `z`: `Float[Array, " dim"]`, the backbone's condition vector for this position.
        - `target`: the true token at this position.
        - `key`: randomness the loss may use (timesteps and noise of a diffusion loss).

        **Returns:**

        A scalar float32 loss; the model averages it over the target positions.
        """

    @abc.abstractmethod
    def sample(
        self,
        z: Condition,
        z_uncond: Condition | None,
        cfg: Float[Array, ""] | float,
        temperature: Float[Array, ""] | float,
        *,
        key: Key,
    ) -> Token:
        """Sample one token.

        **Arguments:**

        - `z`: the conditional condition vector.
        - `z_uncond`: the unconditional one, or `None` to sample without guidance (then
          `cfg` is ignored). Whether it is `None` is static (known at trace time).
        - `cfg`: the guidance scale; 1 means no guidance.
        - `temperature`: sampling temperature; its exact meaning is the head's (logit
          temperature for a softmax, scale of the injected noise for diffusion).
        - `key`: randomness.

        **Returns:**

        One token, of the same kind and shape as a training target.
        """

    @abc.abstractmethod
    def num_evaluations(self) -> int:
        """Network evaluations per sampled token without guidance (1 for one-shot heads).

        Guidance doubles it. Benchmarks count head work with it.
        """


