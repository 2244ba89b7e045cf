"""An in-process transport between a Flower ``ServerApp`` and ``ClientApp``s, for protocol tests.

``InProcessGrid`` implements Flower's ``Grid`` interface by handing each pushed message to
the real ``ClientApp`` of its destination node, in the calling thread, with a per-node
``Context`` that persists across messages as a SuperNode's does. Everything above the
transport is unchanged Flower and privmed code: ``DefaultWorkflow``,
``SecAggPlusWorkflow``, ``secaggplus_mod``, the site policy mod, ``SiteClient``. A
ClientApp exception becomes an error reply, as in Flower's engines.

It exists because Flower's simulation engine always starts Ray (seconds of start-up and
one actor process per CPU), which is too slow for the protocol test tier. Users run
``simulate`` (Flower's simulation engine) or the deployment engine; nothing else uses
this module. Sites run one after another, never concurrently.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.client import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "run_in_process"]

RUN_ID = 1


class InProcessGrid(Grid):
    """Grid over ``num_nodes`` in-process SuperNodes with ids 1..num_nodes."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            nid: Context(
                run_id=RUN_ID, node_id=nid,
                node_config={"partition-id": nid - 1, "num-partitions": num_nodes,
                             **dict((node_configs or {}).get(nid, {}))},
                state=RecordDict(), run_config={},
            )
            for nid in range(1, num_nodes + 1)
        }  # fmt: skip
        self.replies: dict[str, Message] = {}
        self._run = Run.create_empty(RUN_ID)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = RUN_ID
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                # a copy, as serialisation gives every real site its own (mods edit content)
                reply = copy.deepcopy(self.client_app(copy.deepcopy(msg), context))
            except Exception as exc:  # noqa: BLE001 - becomes an error reply, as in Flower
                reason = f"{type(exc)}:<'{exc}'>"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    node_configs: Mapping[int, Mapping[str, Any]] | None = None,
) -> InProcessGrid:
    """Run ``server_app`` to completion against ``num_nodes`` in-process sites."""
    # Flower keeps the running task's identity process-wide; run_simulation sets it the same way
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    grid = InProcessGrid(client_app, num_nodes, node_configs)
    context = Context(run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={})
    server_app(grid, context)
    return grid
