"""Exit delivery: handlers behind one interface and the worker that drains the
persisted queue (``storage.delivery_queue``, re-exported here).

Layering: imports ``errors``, ``records``, ``wire`` and ``storage`` only; the
queue and ``handlers`` never import trio (``worker`` and the handlers' I/O do).
"""

from ..storage.delivery_queue import AcceptResult as AcceptResult
from ..storage.delivery_queue import DeliveryQueue as DeliveryQueue
from ..storage.delivery_queue import FailOutcome as FailOutcome
from ..storage.delivery_queue import MessageState as MessageState
from ..storage.delivery_queue import QueuedMessage as QueuedMessage
from ..storage.delivery_queue import QueueFull as QueueFull
from ..storage.delivery_queue import RetryPolicy as RetryPolicy
from .handlers import DeliveryFailure as DeliveryFailure
from .handlers import DeliveryHandler as DeliveryHandler
from .handlers import Dispatcher as Dispatcher
from .handlers import PermanentFailure as PermanentFailure
from .handlers import TemporaryFailure as TemporaryFailure
from .handlers import build_dispatcher as build_dispatcher
from .maildir import MaildirHandler as MaildirHandler
from .smtp import SmtpHandler as SmtpHandler
from .webhook import WebhookHandler as WebhookHandler
from .worker import DeliveryEvent as DeliveryEvent
from .worker import DeliveryWorker as DeliveryWorker
