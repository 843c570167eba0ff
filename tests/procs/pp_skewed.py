"""A user's pipeline program whose last rank declares PP0 while the others declare PP1
(a config read per host): the topology check must name it on every rank before any
group is built."""

import os

import hardening.runtime as hr


@hr.record
def main() -> None:
    last = int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1
    config = hr.RuntimeConfig(pipeline=hr.PipelineConfig(kind="pp0" if last else "pp1"))
    with hr.Session.from_env(config) as s:
        s.topology()


if __name__ == "__main__":
    main()
