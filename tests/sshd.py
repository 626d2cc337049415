"""A real SSH server on loopback for `edgeft bench --remote` tests (asyncssh, no root needed).

It accepts one generated client key, runs each exec request with ``/bin/sh -c`` in a folder that
plays the remote user's home, and pipes stdin/stdout/stderr both ways as bytes, which is what
OpenSSH's sshd does for a non-interactive command. The client under test is the system's OpenSSH
``ssh``, so the whole path (key auth, channel, exit status, binary tar streams) is the real one.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path


class LoopbackSSHServer:
    def __init__(self, root: Path):
        import asyncssh

        self.root = Path(root)
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key_path = self.root / "id_ed25519"
        client_key.write_private_key(str(self.client_key_path))
        os.chmod(self.client_key_path, 0o600)  # OpenSSH refuses a readable private key
        self._host_key = host_key
        self._authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0
        self.commands: list[str] = []

    def ssh_command(self) -> str:
        """The `--remote-ssh` value that reaches this server with the system's OpenSSH client."""
        return (
            f"ssh -p {self.port} -i {self.client_key_path} -o IdentitiesOnly=yes -o BatchMode=yes "
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
        )

    async def _handle(self, process) -> None:
        self.commands.append(process.command or "")
        # a login's environment, not the test's: no PYTHONPATH or VIRTUAL_ENV leaking into the "device"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home), "LANG": "C.UTF-8"}
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            process.command or "exit 0",
            cwd=self.home,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

        async def pump_in() -> None:
            try:
                while chunk := await process.stdin.read(1 << 16):
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the command stopped reading
            finally:
                proc.stdin.close()

        async def pump_out(src, dst) -> None:
            while chunk := await src.read(1 << 16):
                dst.write(chunk)
                await dst.drain()

        feeder = asyncio.ensure_future(pump_in())
        # every byte of output is sent before the exit status closes the channel
        await asyncio.gather(pump_out(proc.stdout, process.stdout), pump_out(proc.stderr, process.stderr))
        status = await proc.wait()
        feeder.cancel()
        process.exit(status)

    async def _start(self):
        import asyncssh

        server = await asyncssh.create_server(
            asyncssh.SSHServer,
            "127.0.0.1",
            0,
            server_host_keys=[self._host_key],
            authorized_client_keys=self._authorized,
            process_factory=self._handle,
            encoding=None,  # bytes: tar streams go through untouched
        )
        return server

    def __enter__(self) -> LoopbackSSHServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
