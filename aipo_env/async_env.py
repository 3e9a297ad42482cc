"""The synchronous gymnasium API over an environment whose episodes are coroutines."""

from __future__ import annotations

import asyncio
from typing import Any

import gymnasium


class AsyncEnv(gymnasium.Env):
    """A gymnasium env defined by ``areset``/``astep`` coroutines.

    ``reset`` and ``step`` run them on a private event loop, so plain gymnasium code
    (and ``gymnasium.utils.env_checker``) works; inside a running loop, await the
    coroutines instead.
    """

    _loop: asyncio.AbstractEventLoop | None = None

    async def areset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Start an episode."""
        raise NotImplementedError

    async def astep(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Take one action."""
        raise NotImplementedError

    def _run(self, coro: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError(
                f"{type(self).__name__}.reset/step called inside a running event loop; "
                "use 'await env.areset()' and 'await env.astep()'"
            )
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):  # type: ignore[override]
        """Synchronous :meth:`areset` (not inside a running event loop)."""
        return self._run(self.areset(seed=seed, options=options))

    def step(self, action: Any):  # type: ignore[override]
        """Synchronous :meth:`astep` (not inside a running event loop)."""
        return self._run(self.astep(action))

    def close(self) -> None:
        """Close the private event loop of the synchronous API."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()
        self._loop = None
