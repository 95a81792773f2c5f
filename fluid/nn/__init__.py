"""Shared layers: attention, transformer blocks stacked and scanned."""

from ._attention import HEADS_FIRST_MIN_QUERIES as HEADS_FIRST_MIN_QUERIES
from ._attention import SelfAttention as SelfAttention
from ._attention import attention_mask as attention_mask
from ._attention import dot_product_attention as dot_product_attention
from ._cache import KVCache as KVCache
from ._cross_attention import CrossAttention as CrossAttention
from ._dropout import dropout as dropout
from ._init import PerVectorLinear as PerVectorLinear
from ._init import dense as dense
from ._init import embedding as embedding
from ._init import layer_norm as layer_norm
from ._init import linear as linear
from ._init import per_vector as per_vector
from ._mlp import Mlp as Mlp
from ._scan import DEFAULT_REMAT_POLICY as DEFAULT_REMAT_POLICY
from ._scan import RematPolicy as RematPolicy
from ._scan import scan_layers as scan_layers
from ._stack import TransformerStack as TransformerStack
from ._stacked import is_stacked_field as is_stacked_field
from ._stacked import stacked_field as stacked_field
from ._stacked import stacked_paths as stacked_paths
from ._transformer import TransformerBlock as TransformerBlock
