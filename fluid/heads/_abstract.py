import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._types import Condition, Key, Scalar, Token
from ._steps import progress_level


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




class AbstractIterativeHead(AbstractOutputHead):
    """A head that samples by a chain of network evaluations (a diffusion or flow sampler)
    whose number of steps a caller may choose per call.

    `sample(..., steps=k)` runs a chain of `k` steps (`k` static: one compiled chain per
    value); `steps=None` runs the head's own `sampling_steps`, the chain every caller gets
    without asking. `progress_steps` is a step schedule over generation progress in the
    spirit of DiSA (Zhao et al., 2025, arXiv 2505.20297: many steps for an image's first
    tokens, few for its last): progress in [0, 1] is cut into `len(progress_steps)` equal
    intervals and a token sampled in interval `j` gets `progress_steps[j]` steps; `None`
    gives `sampling_steps` everywhere. What progress means is the caller's choice (the
    fraction of the image's tokens already produced when the token is sampled, 0 for the
    first ones, is DiSA's).
    """

    sampling_steps: eqx.AbstractVar[int]
    progress_steps: eqx.AbstractVar[tuple[int, ...] | None]

    @abc.abstractmethod
    def sample(
        self,
        z: Condition,
        z_uncond: Condition | None,
        cfg: Float[Array, ""] | float,
        temperature: Float[Array, ""] | float,
        *,
        key: Key,
        steps: int | None = None,
    ) -> Token:
        """`AbstractOutputHead.sample`, with a chain of `steps` steps (static; `None`:
        `sampling_steps`)."""

    @abc.abstractmethod
    def num_evaluations(self, steps: int | None = None) -> int:
        """Network evaluations per token of a chain of `steps` steps (`None`:
        `sampling_steps`) without guidance; guidance doubles it."""

    def steps_at(self, progress: float) -> int:
        """The chain length for a token sampled at `progress` in [0, 1] (a Python number:
        the caller's schedule is static), from `progress_steps`."""
        if self.progress_steps is None:
            return self.sampling_steps
        return self.progress_steps[progress_level(len(self.progress_steps), progress)]

    def step_choices(self) -> tuple[int, ...]:
        """The distinct chain lengths `steps_at` can return, longest first: the chains a
        caller compiles."""
        if self.progress_steps is None:
            return (self.sampling_steps,)
        return tuple(sorted(set(self.progress_steps), reverse=True))

    def sample_at_progress(
        self,
        progress: Float[Array, ""] | float,
        z: Condition,
        z_uncond: Condition | None,
        cfg: Float[Array, ""] | float,
        temperature: Float[Array, ""] | float,
        *,
        key: Key,
    ) -> Token:
        """`sample` with `steps=steps_at(progress)` for a `progress` known only at run time
        (a traced scalar, e.g. inside a scan over generation steps): one `lax.switch` among
        the chains of `step_choices()`, each compiled once.

        The switch runs one branch while `progress` is the same for every token of a
        batched call (not batched under `vmap`); a batched `progress` turns it into a select
        that runs every branch. The level is computed in float32 (`floor(progress * L)`);
        `steps_at` computes it in float64 on the host.
        """
        choices = self.step_choices()
        if len(choices) == 1:
            return self.sample(z, z_uncond, cfg, temperature, key=key, steps=choices[0])
        levels = self.progress_steps
        branch_of_level = jnp.asarray([choices.index(s) for s in levels], jnp.int32)
        level = jnp.clip(
            jnp.floor(jnp.asarray(progress, jnp.float32) * len(levels)), 0, len(levels) - 1
        ).astype(jnp.int32)
        branches = [
            lambda z, zu, cfg, temp, key, s=s: self.sample(z, zu, cfg, temp, key=key, steps=s)
            for s in choices
        ]
        return jax.lax.switch(branch_of_level[level], branches, z, z_uncond, cfg, temperature,
                              key)

