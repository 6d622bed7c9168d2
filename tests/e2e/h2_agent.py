"""An HTTP/2 agent that speaks frames itself, so a test can make it leave in any way a real client can."""

import json
import socket
import ssl
import struct
import time

import h2.config
import h2.connection
import h2.events


class H2Agent:
    """An HTTP/2 client through the proxy's CONNECT tunnel, speaking frames itself so it can leave in
    any way a real client can."""

    def __init__(self, proxy, key: str, host: str = "api.openai.com", key_header: str = "authorization"):
        raw = socket.create_connection(("127.0.0.1", proxy.proxy_port), timeout=10)
        raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        assert b" 200 " in raw.recv(4096).split(b"\r\n")[0]
        context = ssl.create_default_context(cafile=str(proxy.ca_bundle))
        context.set_alpn_protocols(["h2"])
        self.sock = context.wrap_socket(raw, server_hostname=host)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.host, self.credential = host, (key_header, f"Bearer {key}" if key_header == "authorization" else key)
        self.flush()

    def flush(self):
        self.sock.sendall(self.conn.data_to_send())

    def post(self, body: dict, path: str = "/v1/chat/completions") -> int:
        stream_id = self.conn.get_next_available_stream_id()
        data = json.dumps(body).encode()
        headers = [
            (":method", "POST"), (":path", path), (":scheme", "https"), (":authority", self.host),
            ("content-type", "application/json"), self.credential,
            ("content-length", str(len(data))),
        ]  # fmt: skip
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, data, end_stream=True)
        self.flush()
        return stream_id

    def read_until(self, wanted, timeout: float = 10):
        """Read frames until an event satisfies `wanted`; return it."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):  # or the provider's stream stalls at the window
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if wanted(event):
                    self.flush()
                    return event
            self.flush()
        raise AssertionError("the expected frame never came")

    def tcp_reset(self):
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
