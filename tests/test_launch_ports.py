"""Server ports never collide with the ports SGLang's own processes take."""

import socket

from icecache_sglang.launch import _ephemeral_low, free_port


def test_server_ports_come_from_below_the_ephemeral_range():
    """SGLang's processes take ports with bind(0), from the kernel's ephemeral range, after the harness chose
    and released the server's port; a server port from that range could be handed out again in between
    (a scheduler once listened on its own server's HTTP port). Ports chosen here are below it and free."""
    low = _ephemeral_low()
    ports = {free_port() for _ in range(50)}
    assert all(1024 <= p < low for p in ports), sorted(ports)[-5:]
    assert len(ports) > 10  # spread, not one fixed port for every server
    for p in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
