"""GetEvents and GetEventObjects (spec 10)."""

from plc.methods._util import define_get
from plc.model import Event, EventObject

define_get(Event, ["admin"], doc="Returns an array of structs containing details about events "
                                 "(write calls and their objects; every call in debug mode).")
define_get(EventObject, ["admin"], name="GetEventObjects", lists=False,
           doc="Returns an array of structs, one per object affected by an event.")
