"""Read a kernel's SASS (``cuobjdump -sass``): tensor-core ops, load kinds, the main loop.

The figures the compile-check reports for each compiled kernel:

- tensor cores: ``HGMMA`` (wgmma, sm_90) and ``HMMA`` (mma.sync) instructions;
- global loads: asynchronous ones (``LDGSTS`` is cp.async, ``UTMALDG`` / ``UBLKCP`` are TMA bulk
  copies) against plain ``LDG``;
- the main loop: the innermost loop (a backward branch and its target) that holds a tensor-core
  op, else the innermost loop with the most instructions; its instruction count is the cost of
  one step, and whether it waits for its own wgmma (``WARPGROUP.DEPBAR.LE gsb0, 0x0`` inside
  the loop) says if math and the next loads overlap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_INSTRUCTION = re.compile(
    r"^\s*/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<text>[A-Z][^;]*);"
)
_BRANCH_TARGET = re.compile(r"\bBRA\s+0x(?P<target>[0-9a-f]+)")

TENSOR_CORE_OPS = ("HGMMA", "HMMA")
ASYNC_LOAD_OPS = ("LDGSTS", "UTMALDG", "UBLKCP")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # the full opcode with modifiers, e.g. "LDGSTS.E.BYPASS.128"
    text: str

    @property
    def op(self) -> str:
        """The opcode without modifiers, e.g. "LDGSTS"."""
        return self.opcode.split(".")[0]


def parse(sass: str) -> list[Instruction]:
    """The instructions of the first kernel function in ``cuobjdump -sass`` output."""
    instructions = []
    for line in sass.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            text = match.group("text").strip()
            instructions.append(Instruction(int(match.group("addr"), 16), text.split()[0], text))
    return instructions


def loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """(first, last) addresses of every loop: a branch back to an earlier address."""
    found = []
    for ins in instructions:
        if ins.op != "BRA":
            continue
        match = _BRANCH_TARGET.search(ins.text)
        if match and int(match.group("target"), 16) < ins.address:
            found.append((int(match.group("target"), 16), ins.address))
    return found


@dataclass(frozen=True)
class LoopStats:
    instructions: int = 0
    tensor_core: int = 0
    async_loads: int = 0
    plain_loads: int = 0
    waits_for_mma: bool = False


@dataclass(frozen=True)
class SassStats:
    """What :func:`analyse` reads off one kernel."""

    instructions: int
    wgmma: int
    mma_sync: int
    async_loads: int
    plain_loads: int
    main_loop: LoopStats | None

    @property
    def tensor_core(self) -> str:
        return "wgmma" if self.wgmma else ("mma" if self.mma_sync else "none")


def _loop_stats(body: list[Instruction]) -> LoopStats:
    return LoopStats(
        instructions=len(body),
        tensor_core=sum(ins.op in TENSOR_CORE_OPS for ins in body),
        async_loads=sum(ins.op in ASYNC_LOAD_OPS for ins in body),
        plain_loads=sum(ins.op == "LDG" for ins in body),
        waits_for_mma=any(ins.opcode == "WARPGROUP.DEPBAR.LE" and "gsb0, 0x0" in ins.text
                          for ins in body),
    )


def main_loop(instructions: list[Instruction]) -> LoopStats | None:
    """Statistics of the main loop (see the module docstring), or None without loops."""
    spans = loops(instructions)
    if not spans:
        return None
    bodies = {span: [ins for ins in instructions if span[0] <= ins.address <= span[1]]
              for span in spans}

    def innermost_first(span):
        return span[1] - span[0]

    with_math = [span for span in spans
                 if any(ins.op in TENSOR_CORE_OPS for ins in bodies[span])]
    if with_math:
        return _loop_stats(bodies[min(with_math, key=innermost_first)])
    innermost = [span for span in spans
                 if not any(other != span and span[0] <= other[0] and other[1] <= span[1]
                            for other in spans)]
    return _loop_stats(bodies[max(innermost, key=lambda span: len(bodies[span]))])


def analyse(sass: str) -> SassStats:
    instructions = parse(sass)
    return SassStats(
        instructions=len(instructions),
        wgmma=sum(ins.op == "HGMMA" for ins in instructions),
        mma_sync=sum(ins.op == "HMMA" for ins in instructions),
        async_loads=sum(ins.op in ASYNC_LOAD_OPS for ins in instructions),
        plain_loads=sum(ins.op == "LDG" for ins in instructions),
        main_loop=main_loop(instructions),
    )
