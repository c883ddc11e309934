"""The one vocabulary of ops that leave values alone, by what they keep: every pass and check that walks through
such ops (the matcher's back-to-back chains, the lowering's on-grid walk, the parity check's output step, the
non-negativity pattern) builds its set from these, so a new reshape-like op is added once.

- shape ops move values without changing any (reshape, permute, identity, dropout in eval);
- selection ops keep a subset of the input's values (max pooling, indexing);
- the matcher's chain adds BatchNorm and ReLU-like ops (folded into a layer or its quantizer), the non-negativity
  walk averages and interpolation (they keep signs, not values).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MAX_POOL_FUNCTIONS", "MAX_POOL_MODULES", "RESHAPE_METHODS", "SELECT_FUNCTIONS", "SHAPE_FUNCTIONS",
           "SHAPE_METHODS", "SHAPE_MODULES"]

# views that keep the element order: free between two layers (a chain) as well as on any grid
RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "contiguous"})
# every method that only moves values
SHAPE_METHODS = RESHAPE_METHODS | {"permute", "transpose", "squeeze", "unsqueeze"}
SHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout2d)
SHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, F.dropout})
# ops that select some of their input's values
MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d)
MAX_POOL_FUNCTIONS = frozenset({F.max_pool1d, F.max_pool2d, torch.max_pool1d, torch.max_pool2d})
SELECT_FUNCTIONS = MAX_POOL_FUNCTIONS | {operator.getitem}
