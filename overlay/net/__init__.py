"""Network layer: the py-libp2p adapter and stream framing.

Only this package imports libp2p; everything above it sees ``Libp2pHost``
(bytes in, bytes out) and the framing helpers.
"""

from .framing import DEFAULT_MAX_FRAME_SIZE as DEFAULT_MAX_FRAME_SIZE
from .framing import FrameDecoder as FrameDecoder
from .framing import FrameReader as FrameReader
from .framing import encode_frame as encode_frame
from .framing import encode_uvarint as encode_uvarint
from .framing import read_exactly as read_exactly
from .framing import read_frame as read_frame
from .framing import write_frame as write_frame
from .host import DhtError as DhtError
from .host import DhtTimeout as DhtTimeout
from .host import DialError as DialError
from .host import DialTimeout as DialTimeout
from .host import GossipMessage as GossipMessage
from .host import GossipValidator as GossipValidator
from .host import Libp2pHost as Libp2pHost
from .host import NetError as NetError
from .host import RecordValidator as RecordValidator
from .host import Stream as Stream
from .host import StreamBroken as StreamBroken
from .host import StreamHandler as StreamHandler
from .host import StreamLimitReached as StreamLimitReached
from .host import StreamOpenError as StreamOpenError
from .host import StreamOpenTimeout as StreamOpenTimeout
from .host import Subscription as Subscription
