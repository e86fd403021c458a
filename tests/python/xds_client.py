"""A proxyless gRPC client that knows nothing of the registry but xDS.

Used by tests/xds_python.rs: it dials an `xds:///` target with stock
grpcio, which reads GRPC_XDS_BOOTSTRAP, asks the registry's ADS endpoint
for Listener -> RouteConfiguration -> Cluster -> ClusterLoadAssignment, and
balances calls over the endpoints it was given. Each call's outcome goes to
stdout as one line, flushed, so the test can follow it live:

    ok <instance_id>
    err <status code>

Usage: xds_client.py TARGET SECONDS INTERVAL
The prod_pb2 modules are generated from proto/examples/prod.proto by the
test (grpcio-tools) and found through PYTHONPATH. The client stops after
SECONDS, or earlier when its stdin closes (the test went away).
"""

import sys
import threading
import time

import grpc

import prod_pb2
import prod_pb2_grpc


def stop_on_stdin_eof(stop: threading.Event) -> None:
    sys.stdin.read()
    stop.set()


def main() -> int:
    target, seconds, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    stop = threading.Event()
    threading.Thread(target=stop_on_stdin_eof, args=(stop,), daemon=True).start()
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(target) as channel:
        stub = prod_pb2_grpc.ProdServiceStub(channel)
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                resp = stub.GetProductStock(prod_pb2.ProductRequest(prod_id=233), timeout=1.0)
                if resp.prod_stock != 233 * 7 % 1000:
                    print(f"err WRONG_ANSWER {resp.prod_stock}", flush=True)
                else:
                    print(f"ok {resp.instance_id}", flush=True)
            except grpc.RpcError as e:
                print(f"err {e.code().name}", flush=True)
            stop.wait(interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
