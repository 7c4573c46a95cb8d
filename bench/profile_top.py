"""Summarise a py-spy raw (collapsed) profile: `python -m bench.profile_top FILE [N]`.

Prints the functions with the most samples anywhere on the stack (inclusive) and on top (self).
"""

from __future__ import annotations

import sys
from collections import Counter


def main(path: str, n: int = 40) -> None:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += samples
        own[frames[-1]] += samples
    print(f"{total} samples\n--- inclusive")
    for frame, c in inclusive.most_common(n):
        print(f"{100 * c / total:5.1f}%  {frame[:150]}")
    print("--- self")
    for frame, c in own.most_common(n // 2):
        print(f"{100 * c / total:5.1f}%  {frame[:150]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
