"""The port helper tests use for Ray nodes and servers."""

import socket

from ports import free_ports


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_ports_sit_below_the_ephemeral_range_a_later_bind_to_port_0_draws_from():
    from ports import _LOW, _ephemeral_low

    assert all(_LOW <= p < _ephemeral_low() for p in free_ports(16))
