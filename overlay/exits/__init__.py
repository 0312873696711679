"""Exit delivery: handlers behind one interface, the persisted queue and its worker.

Layering: imports ``errors``, ``records`` and ``wire`` only; ``queue`` and
``handlers`` never import trio (``worker`` and the handlers' I/O do).
"""

from .handlers import DeliveryFailure as DeliveryFailure
from .handlers import DeliveryHandler as DeliveryHandler
from .handlers import Dispatcher as Dispatcher
from .handlers import PermanentFailure as PermanentFailure
from .handlers import TemporaryFailure as TemporaryFailure
from .handlers import build_dispatcher as build_dispatcher
from .maildir import MaildirHandler as MaildirHandler
from .queue import AcceptResult as AcceptResult
from .queue import DeliveryQueue as DeliveryQueue
from .queue import FailOutcome as FailOutcome
from .queue import MessageState as MessageState
from .queue import QueuedMessage as QueuedMessage
from .queue import QueueFull as QueueFull
from .queue import RetryPolicy as RetryPolicy
from .smtp import SmtpHandler as SmtpHandler
from .webhook import WebhookHandler as WebhookHandler
from .worker import DeliveryEvent as DeliveryEvent
from .worker import DeliveryWorker as DeliveryWorker
