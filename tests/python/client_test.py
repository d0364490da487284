"""A gRPC client in another language: Python stubs generated from proto/, talking to a
running command server and query server (addresses from the environment).

Checks a command/query round trip with read-your-writes, the rich error details of a
bad request and of a refused command, idempotent retries, and a watch.

Against a secure stack (SHOP_PY_TLS_CA set: `scripts/test-python-client.sh --secure`) it
connects over mTLS with the client certificate (CN=shop-client, a reader) and sends the
writer token (SHOP_PY_WRITER_TOKEN) with commands; it also checks that the certificate
alone may not write, that a wrong token is UNAUTHENTICATED, and that the history names the
token's owner as the actor.
"""

import os
import sys
import threading
import unittest
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

sys.path.insert(0, os.environ["SHOP_PY_GEN"])
from shop.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc  # noqa: E402

COMMAND = os.environ["SHOP_COMMAND_ADDR"]
QUERY = os.environ["SHOP_QUERY_ADDR"]
TLS_CA = os.environ.get("SHOP_PY_TLS_CA")


def channel(address, token=None):
    """A plaintext channel, or under TLS one with the client certificate and `token`."""
    if not TLS_CA:
        return grpc.insecure_channel(address)

    def read(name):
        with open(os.environ[name], "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("SHOP_PY_TLS_CA"),
        private_key=read("SHOP_PY_TLS_KEY"),
        certificate_chain=read("SHOP_PY_TLS_CERT"))
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(address, credentials)


def details(error):
    status = rpc_status.from_call(error)
    out = {}
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            out["fields"] = [v.field for v in br.field_violations]
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
    return out


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        writer = os.environ.get("SHOP_PY_WRITER_TOKEN")
        cls.commands = commands_pb2_grpc.CommandServiceStub(channel(COMMAND, writer))
        cls.queries = queries_pb2_grpc.QueryServiceStub(channel(QUERY))
        cls.tag = uuid.uuid4().hex[:8]

    def test_round_trip_with_read_your_writes(self):
        c = self.commands
        customer = f"py-{self.tag}"
        c.RegisterCustomer(commands_pb2.RegisterCustomerRequest(
            customer_id=customer, name="Py Thon", email=f"{customer}@example.com"), timeout=10)
        c.CreateProduct(commands_pb2.CreateProductRequest(
            sku=f"sku-{self.tag}", name="Snake", price_cents=499, initial_stock=5), timeout=10)
        placed = c.PlaceOrder(commands_pb2.PlaceOrderRequest(
            customer_id=customer,
            lines=[commands_pb2.OrderLineRequest(sku=f"sku-{self.tag}", quantity=2)]), timeout=10)
        self.assertTrue(placed.id, "the server generates the order id")
        order = self.queries.GetOrder(
            queries_pb2.GetOrderRequest(order_id=placed.id, min_position=placed.position), timeout=10)
        self.assertEqual(order.total_cents, 998)
        self.assertEqual(order.customer_name, "Py Thon")
        self.assertEqual(order.status, queries_pb2.ORDER_STATUS_PLACED)

    def test_bad_request_names_the_fields(self):
        with self.assertRaises(grpc.RpcError) as caught:
            self.commands.RegisterCustomer(commands_pb2.RegisterCustomerRequest(
                customer_id="no spaces allowed", name="", email="nope"), timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(details(caught.exception)["fields"], ["customer_id", "name", "email"])

    def test_refusal_carries_a_reason(self):
        with self.assertRaises(grpc.RpcError) as caught:
            self.commands.RenameCustomer(commands_pb2.RenameCustomerRequest(
                customer_id=f"ghost-{self.tag}", name="x"), timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(details(caught.exception)["reason"], "CUSTOMER_NOT_FOUND")

    def test_retry_with_the_same_command_id_is_idempotent(self):
        request = commands_pb2.CreateProductRequest(
            command_id=f"cmd-{self.tag}", sku=f"idem-{self.tag}", name="Once", price_cents=1, initial_stock=1)
        first = self.commands.CreateProduct(request, timeout=10)
        second, call = self.commands.CreateProduct.with_call(request, timeout=10)
        self.assertEqual(first, second)
        self.assertIn(("shop-replayed", "true"), call.initial_metadata())

    def test_watch_sees_the_next_change(self):
        customer = f"watch-{self.tag}"
        r = self.commands.RegisterCustomer(commands_pb2.RegisterCustomerRequest(
            customer_id=customer, name="Before", email=f"{customer}@example.com"), timeout=10)
        stream = self.queries.WatchCustomer(
            queries_pb2.WatchCustomerRequest(customer_id=customer, min_position=r.position), timeout=20)
        first = next(stream)
        self.assertEqual(first.name, "Before")
        threading.Thread(target=lambda: self.commands.RenameCustomer(
            commands_pb2.RenameCustomerRequest(customer_id=customer, name="After"), timeout=10)).start()
        second = next(stream)
        self.assertEqual(second.name, "After")
        stream.cancel()


@unittest.skipUnless(TLS_CA, "needs the secure stack (scripts/test-python-client.sh --secure)")
class SecureClientTest(unittest.TestCase):
    def test_certificate_alone_may_read_not_write(self):
        commands = commands_pb2_grpc.CommandServiceStub(channel(COMMAND))
        with self.assertRaises(grpc.RpcError) as caught:
            commands.RegisterCustomer(commands_pb2.RegisterCustomerRequest(
                customer_id="cert-only", name="C", email="cert-only@example.com"), timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(details(caught.exception)["reason"], "MISSING_ROLE")

    def test_wrong_token_is_unauthenticated(self):
        queries = queries_pb2_grpc.QueryServiceStub(channel(QUERY, "not-a-token"))
        with self.assertRaises(grpc.RpcError) as caught:
            queries.GetStatus(queries_pb2.GetStatusRequest(), timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAUTHENTICATED)

    def test_history_names_the_actor(self):
        commands = commands_pb2_grpc.CommandServiceStub(
            channel(COMMAND, os.environ["SHOP_PY_WRITER_TOKEN"]))
        customer = f"actor-{uuid.uuid4().hex[:8]}"
        r = commands.RegisterCustomer(commands_pb2.RegisterCustomerRequest(
            customer_id=customer, name="A", email=f"{customer}@example.com"), timeout=10)
        queries = queries_pb2_grpc.QueryServiceStub(channel(QUERY))
        history = queries.GetHistory(queries_pb2.GetHistoryRequest(
            stream_id=f"customer-{customer}", min_position=r.position), timeout=10)
        self.assertEqual([e.actor for e in history.events], ["orders-app"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
