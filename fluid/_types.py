"""One vocabulary of dimension names for every public signature in fluid.

Dimension names used in annotations:

- `seq`: image-token positions of one example (the tokenizer's grid, flattened row-major).
- `token_dim`: channels of one continuous token.
- `dim`: width of the backbone (and of the condition vectors it gives the head).
- `ctx`: text-token positions of one caption; `text_dim`: width of a text encoder.
- `vocab`: size of a discrete codebook or text vocabulary.
- `h w`: image height and width in pixels; images always have 3 channels in [-1, 1].
- `batch`: examples; only `FluidModel` and the trainer ever see it.
"""

from typing import TypeAlias

from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray
from jaxtyping import Key as TypedKey

Image: TypeAlias = Float[Array, "h w 3"]
ContinuousTokens: TypeAlias = Float[Array, "seq token_dim"]
DiscreteTokens: TypeAlias = Int[Array, " seq"]
Tokens: TypeAlias = ContinuousTokens | DiscreteTokens
# One token: a vector for continuous tokenizers, a scalar code for discrete ones.
Token: TypeAlias = Float[Array, " token_dim"] | Int[Array, ""]
Condition: TypeAlias = Float[Array, " dim"]
TextIds: TypeAlias = Int[Array, " ctx"]
TextMask: TypeAlias = Bool[Array, " ctx"]
Context: TypeAlias = Float[Array, "ctx dim"]
Key: TypeAlias = PRNGKeyArray
Keys: TypeAlias = TypedKey[Array, " batch"]  # one typed key per example
Scalar: TypeAlias = Float[Array, ""]

CONTINUOUS = "continuous"
DISCRETE = "discrete"
CAUSAL = "causal"
BIDIRECTIONAL = "bidirectional"

__all__ = [
    "Array",
    "Bool",
    "Float",
    "Int",
    "Image",
    "ContinuousTokens",
    "DiscreteTokens",
    "Tokens",
    "Token",
    "Condition",
    "TextIds",
    "TextMask",
    "Context",
    "Key",
    "Keys",
    "Scalar",
    "CONTINUOUS",
    "DISCRETE",
    "CAUSAL",
    "BIDIRECTIONAL",
]
