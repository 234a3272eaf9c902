"""The compiled CoMon expressions (selectexpr.compile_expr) give what the tree walker
(selectexpr.evaluate) gives, over random expressions and rows with missing, numeric,
numeric-string and string values."""

from __future__ import annotations

import random

from sensors import selectexpr

COLS = ("load", "1 minload", "name", "n")
VALUES = (None, 0, 3, -2.5, 7.25, "4", "x.y", "", "1e3")


def expr(rng: random.Random, depth: int) -> str:
    if depth <= 0 or rng.random() < 0.25:
        return rng.choice([*COLS, "null", "0", "2", "3.5", "1m", '"x.y"', '"4"'])
    kind = rng.randrange(5)
    if kind == 0:
        return f"!{expr(rng, depth - 1)}"
    if kind == 1:
        return f"-{expr(rng, depth - 1)}"
    if kind == 2:
        return f"({expr(rng, depth - 1)})"
    op = rng.choice(["||", "&&", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "/", "="])
    return f"{expr(rng, depth - 1)} {op} {expr(rng, depth - 1)}"


def test_compiled_equals_tree_walk() -> None:
    rng = random.Random(11)
    checked = 0
    for _ in range(3000):
        text = expr(rng, 4)
        try:
            tree = selectexpr.parse(text, COLS)
        except selectexpr.ExprError:
            continue
        f = selectexpr.compile_expr(tree)
        for _ in range(6):
            row = {c: rng.choice(VALUES) for c in COLS if rng.random() < 0.85}
            want = selectexpr.evaluate(tree, row)
            got = f(row)
            assert got == want and type(got) is type(want), (text, row, got, want)
            assert selectexpr.predicate(tree)(row) == selectexpr.matches(tree, row)
            checked += 1
    assert checked > 5000
