"""Pure signed records: capability cards, DHT keys, expiry, validation."""

from p2pedge.records.card import CachedModel as CachedModel
from p2pedge.records.card import CapabilityCard as CapabilityCard
from p2pedge.records.card import ServedLayers as ServedLayers
from p2pedge.records.card import card_key as card_key
from p2pedge.records.card import sign_card as sign_card
from p2pedge.records.card import verify_card as verify_card
