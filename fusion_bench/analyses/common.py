"""What every analysis shares: the tasks it looks at, and the methods it can run."""

from __future__ import annotations


def chosen_tasks(fam, names, count: int | None = None) -> list[str]:
    """`analysis.tasks`, checked against taskpool.tasks; None: the pool's tasks (its first `count`)."""
    pool = list(fam.cfg.taskpool.tasks)
    tasks = list(names) if names else pool[:count] if count else pool
    if [t for t in tasks if t not in pool] or (count and len(tasks) != count) or len(set(tasks)) != len(tasks):
        raise ValueError(f"analysis.tasks={tasks}: give {count or 'one or more'} distinct task(s) of taskpool.tasks "
                         f"{pool}")
    return tasks


def require_plain_method(method, method_name: str, who: str) -> None:
    """Analyses that merge by calling the method on fine-tunes alone (heads, pairwise) cannot run methods that the
    pipeline prepares first: lambdas chosen on val (TALL, Consensus), statistics (RegMean, Fisher) or learnt
    coefficients (AdaMerging, LoraHub)."""
    cfg = method.cfg
    if cfg.get("lambdas") == "search" or cfg.get("statistics") is not None or cfg.get("coefficients") is not None:
        raise ValueError(f"analysis={who} calls method={method_name} on the fine-tunes alone; it needs lambdas chosen "
                         f"on val, statistics or learnt coefficients, which this analysis does not prepare: use a "
                         f"data-free method with a scaling coefficient (task_arithmetic, ties, dare, awd_ta, ...)")
