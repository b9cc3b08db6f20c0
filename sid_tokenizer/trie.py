"""A prefix trie over the catalogue's SIDs, stored as per-level CSR arrays (numpy).

Nodes at depth ``d`` (prefixes of ``d`` codes) are numbered ``0..n_d-1``; the root is node 0
at depth 0. For depth ``d`` the children of node ``k`` are
``child_codes[d][offsets[d][k]:offsets[d][k+1]]`` (sorted codes) leading to nodes
``child_nodes[d][...]`` at depth ``d+1``. Building is a handful of ``np.unique`` calls, so
1M SIDs take about a second; stepping a batch of beams is vectorised with ``searchsorted``.
"""

from __future__ import annotations

import numpy as np


class SidTrie:
    def __init__(self, codes: np.ndarray, level_sizes: tuple[int, ...] | None = None) -> None:
        """codes: int array (num_items, num_levels) of valid SIDs (duplicates allowed)."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or len(codes) == 0:
            raise ValueError(f"codes must be a non-empty (items, levels) array, got shape {codes.shape}")
        self.num_levels = codes.shape[1]
        self.level_sizes = tuple(level_sizes) if level_sizes else tuple(int(m) + 1 for m in codes.max(0))
        if (codes < 0).any() or any((codes[:, lv] >= n).any() for lv, n in enumerate(self.level_sizes)):
            raise ValueError("codes out of range of level_sizes")
        self.offsets: list[np.ndarray] = []
        self.child_codes: list[np.ndarray] = []
        self.child_nodes: list[np.ndarray] = []
        self.edge_keys: list[np.ndarray] = []  # parent * level_size + code, sorted
        # node id of every item's prefix at the current depth
        node_of_item = np.zeros(len(codes), dtype=np.int64)
        num_nodes = 1
        for d in range(self.num_levels):
            # unique (parent node, code) edges, sorted by parent then code
            key = node_of_item * self.level_sizes[d] + codes[:, d]
            uniq, inverse = np.unique(key, return_inverse=True)
            parents = uniq // self.level_sizes[d]
            self.edge_keys.append(uniq)
            self.child_codes.append((uniq % self.level_sizes[d]).astype(np.int64))
            self.child_nodes.append(np.arange(len(uniq), dtype=np.int64))
            self.offsets.append(np.searchsorted(parents, np.arange(num_nodes + 1)).astype(np.int64))
            node_of_item = inverse.reshape(-1)
            num_nodes = len(uniq)
        self.leaf_of_item = node_of_item
        self.num_leaves = num_nodes

    def __len__(self) -> int:
        return self.num_leaves

    def children(self, depth: int, node: int) -> np.ndarray:
        """Allowed codes after the prefix that is ``node`` at ``depth``."""
        s, e = self.offsets[depth][node], self.offsets[depth][node + 1]
        return self.child_codes[depth][s:e]

    def step(self, depth: int, nodes: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Vectorised transition: nodes at ``depth`` + codes -> nodes at depth+1 (-1 if invalid).

        nodes, codes: int arrays (B,). A node of -1 stays -1.
        """
        nodes = np.asarray(nodes, dtype=np.int64)
        codes = np.asarray(codes, dtype=np.int64)
        out = np.full(nodes.shape, -1, dtype=np.int64)
        ok = nodes >= 0
        if not ok.any():
            return out
        n = nodes[ok]
        c = codes[ok]
        size = self.level_sizes[depth]
        keys = self.edge_keys[depth]  # sorted by (parent, code)
        want = n * size + c
        pos = np.searchsorted(keys, want)
        pos_c = np.minimum(pos, len(keys) - 1)
        hit = (pos < len(keys)) & (keys[pos_c] == want) & (c >= 0) & (c < size)
        res = np.where(hit, self.child_nodes[depth][pos_c], -1)
        out[ok] = res
        return out

    def walk(self, prefixes: np.ndarray) -> np.ndarray:
        """prefixes: int array (B, d) of codes -> node ids at depth d (-1 where not a valid prefix)."""
        prefixes = np.asarray(prefixes, dtype=np.int64)
        if prefixes.ndim == 1:
            prefixes = prefixes.reshape(len(prefixes), -1)
        nodes = np.zeros(len(prefixes), dtype=np.int64)
        for d in range(prefixes.shape[1]):
            nodes = self.step(d, nodes, prefixes[:, d])
        return nodes

    def allowed_pairs(self, depth: int, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row's node at ``depth``: (row indices, allowed codes), flattened (CSR gather).

        Rows whose node is -1 get nothing.
        """
        nodes = np.asarray(nodes, dtype=np.int64)
        valid = nodes >= 0
        safe = np.where(valid, nodes, 0)
        starts = self.offsets[depth][safe]
        lens = np.where(valid, self.offsets[depth][safe + 1] - starts, 0)
        rows = np.repeat(np.arange(len(nodes)), lens)
        # positions starts[r] + 0..lens[r]-1 without a Python loop
        cum = np.cumsum(lens) - lens
        pos = np.arange(int(lens.sum())) - np.repeat(cum, lens) + np.repeat(starts, lens)
        return rows, self.child_codes[depth][pos]

    def contains(self, codes: np.ndarray) -> np.ndarray:
        """Bool (B,): is each full SID in the trie?"""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.num_levels)
        return self.walk(codes) >= 0
