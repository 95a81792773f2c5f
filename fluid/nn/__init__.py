"""Shared layers: attention, transformer blocks stacked and scanned."""

from ._attention import attention_mask as attention_mask
from ._attention import dot_product_attention as dot_product_attention
from ._attention import SelfAttention as SelfAttention
from ._cache import KVCache as KVCache
from ._cross_attention import CrossAttention as CrossAttention
from ._init import dense as dense
from ._init import vector_products as vector_products
from ._mlp import Mlp as Mlp
from ._scan import scan_layers as scan_layers
from ._stack import TransformerStack as TransformerStack
from ._transformer import TransformerBlock as TransformerBlock
