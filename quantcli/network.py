"""Bounded waits on the Hub: every request huggingface_hub makes gets a connect and a read
timeout, so a stalled endpoint ends the command instead of hanging it.

huggingface_hub's shared HTTP client waits forever by default (only downloads pass their
own timeouts), and its HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT are read at import.
"""

from __future__ import annotations

#: Seconds a Hub request may take to connect, and then between two received bytes.
DEFAULT_HUB_TIMEOUT = 15.0
HUB_TIMEOUT_ENV = "QUANTCLI_HUB_TIMEOUT"


def bound_hub_requests(seconds: float) -> None:
    """Give every Hub request, uploads included, `seconds` to connect and to read: as the
    client's default, and in place of the "no timeout" some calls pass explicitly."""
    import httpx2
    from huggingface_hub import constants, get_session, set_client_factory

    class BoundedTransport(httpx2.HTTPTransport):
        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            timeouts = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {
                phase: seconds if timeouts.get(phase) is None else timeouts[phase]
                for phase in ("connect", "read", "write", "pool")
            }
            return super().handle_request(request)

    constants.HF_HUB_ETAG_TIMEOUT = constants.HF_HUB_DOWNLOAD_TIMEOUT = seconds
    hooks = get_session().event_hooks  # huggingface_hub's own (request ids, logging)
    set_client_factory(
        lambda: httpx2.Client(
            transport=BoundedTransport(),
            event_hooks=hooks,
            follow_redirects=True,
            timeout=seconds,
        )
    )


def is_network_failure(error: BaseException) -> bool:
    """A timeout, reset, refused connection or broken transfer (not an HTTP status)."""
    from httpx2 import TransportError

    return isinstance(error, TransportError)
