-- Offers together with presence and overflow.
--
-- Per source, `expire_to_away` (0 = off): an operator who lets that many offers of the
-- source in a row lapse unanswered is set away (operator.presence_changed, reason
-- expired_offers). "In a row" counts the offers made to them since their presence last
-- changed (`presence_changed_at`), so coming back online starts the count afresh; the
-- index finds an operator's latest offers of a source.
ALTER TABLE sources ADD COLUMN expire_to_away integer NOT NULL DEFAULT 0
    CHECK (expire_to_away BETWEEN 0 AND 1000);
ALTER TABLE operators ADD COLUMN presence_changed_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX offers_operator_latest ON offers (operator_id, source_id, offered_at DESC);

-- A pending offer made through overflow, by another source's routing than the contact's
-- own: that source, whose smooth share a decline or lapse gives back, and whose offer it
-- is in `offers` (NULL: the contact's own source made it).
ALTER TABLE contacts ADD COLUMN offer_source_id bigint;
