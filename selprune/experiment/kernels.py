"""The Jupyter kernels the notebooks run in (papermill in `selprune run`, nbclient in
`make notebooks`): where they listen, and a client that cannot miss a kernel's message.

A missed message is not hypothetical. jupyter_client's asyncio channels wait for a
message on the socket's file descriptor, which libzmq signals edge-triggered: a read of
the socket's event state between the message's arrival and the event loop's next look
consumes the signal, and the message already in the socket is then never seen
(tests/experiment/test_kernels.py makes that happen on purpose). papermill waits for a
cell's execute_reply with no timeout, so such a wait never ends: in a clean-clone CI run
of this suite, notebook 05 of a papermill series sat for over ten minutes with its
kernel idle and the reply unread, and 12 kernels running 200 short cells each through
nbclient stalled in 4 of the 12. A poll with a timeout looks at the socket itself when
the timeout expires, so `SlicedChannel` waits in slices of `POLL_SLICE_S`: a lost
wake-up costs at most one slice (the same 12 kernels: no stall).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from jupyter_client import AsyncKernelManager
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_core import paths as jupyter_paths
from traitlets import Type, default

POLL_SLICE_S = 0.25  # the longest a lost wake-up can delay a message

# A Unix socket path must fit in sun_path (104 bytes on macOS, 108 on Linux). Kernel
# sockets are named PREFIX-<port>, PREFIX = Jupyter's runtime folder/selprune-<12 hex>.
_IPC_NAME_BYTES = len("/selprune-000000000000-65535")
_SUN_PATH_BYTES = 104


class SlicedChannel(AsyncZMQSocketChannel):
    """An asyncio channel whose wait for a message is a series of short polls."""

    async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message; `queue.Empty` after `timeout` seconds (None: wait for ever)."""
        assert self.socket is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_SLICE_S if deadline is None else min(POLL_SLICE_S, max(0.0, deadline - time.monotonic()))
            if await self.socket.poll(int(wait * 1000)):  # on expiry, pyzmq polls the socket itself
                return await self._recv()
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty


class SlicedKernelClient(AsyncKernelClient):
    """jupyter_client's asyncio kernel client with `SlicedChannel`s (the heartbeat has its own)."""

    shell_channel_class = Type(SlicedChannel)
    iopub_channel_class = Type(SlicedChannel)
    stdin_channel_class = Type(SlicedChannel)
    control_channel_class = Type(SlicedChannel)


class SelpruneKernelManager(AsyncKernelManager):
    """A kernel manager whose clients are `SlicedKernelClient`s."""

    @default("client_factory")
    def _client_factory_default(self) -> type:
        return SlicedKernelClient


def kernel_manager_class() -> type:
    """The kernel manager each notebook's kernel is started with: `SelpruneKernelManager`
    over IPC transport (Unix sockets in Jupyter's private runtime folder) where the
    platform has it and the path fits, else over jupyter_client's default TCP on
    localhost. Over TCP, ipykernel >= 7 warns in every run that the connection is
    unencrypted."""
    runtime = jupyter_paths.jupyter_runtime_dir()  # looked up at call time (tests replace it)
    if os.name != "posix" or len(os.fsencode(runtime)) + _IPC_NAME_BYTES >= _SUN_PATH_BYTES:
        return SelpruneKernelManager

    class IPCKernelManager(SelpruneKernelManager):
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

        @default("ip")
        def _ip_default(self) -> str:
            # A unique prefix per kernel in the user's runtime folder. jupyter_client's own
            # default, "kernel-ipc" in the working directory, litters it and collides
            # between runs started there at once.
            Path(runtime).mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.path.join(runtime, f"selprune-{uuid.uuid4().hex[:12]}")

    return IPCKernelManager
