"""The default executor: every call in the driver's own process, in order, when the driver asks for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

_NOT_RUN = object()


class _Deferred:
    """Runs its call on the first `result()` (so the driver commits group by group, as results come)."""

    def __init__(self, fn: Callable[..., Any], args: tuple, job_id: str):
        self.fn, self.args, self.job_id = fn, args, job_id
        self._value: Any = _NOT_RUN

    def result(self) -> Any:
        if self._value is _NOT_RUN:
            self._value = self.fn(*self.args)  # an error propagates as it is: this is the driver's process
        return self._value


class SerialExecutor:
    in_process = True

    def submit(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[_Deferred]:
        return [_Deferred(fn, tuple(args), f"serial-{i}") for i, args in enumerate(calls)]

    def as_completed(self, handles: Sequence[_Deferred]) -> Iterator[_Deferred]:
        yield from handles  # "completed" once the driver reads its result

    def close(self) -> None:
        pass
