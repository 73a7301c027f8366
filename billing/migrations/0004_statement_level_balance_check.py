"""Check ledger balance once per INSERT statement instead of once per entry row.

The deferred row-level constraint trigger ran one SUM per inserted entry at commit (three
per usage event); this statement-level trigger checks every transaction touched by the
statement in one grouped query over its transition table. It is stricter too: the legs of a
transaction must be written by one statement (``transaction_post`` and usage ingest do so).
"""

from django.db import migrations

FORWARD = """
DROP TRIGGER IF EXISTS billing_ledgerentry_balanced ON billing_ledgerentry;
DROP FUNCTION IF EXISTS billing_check_balanced();

CREATE OR REPLACE FUNCTION billing_check_balanced_statement() RETURNS trigger AS $$
DECLARE
    unbalanced bigint;
    total numeric;
BEGIN
    SELECT e.transaction_id, SUM(e.amount) INTO unbalanced, total
      FROM billing_ledgerentry e
     WHERE e.transaction_id IN (SELECT DISTINCT transaction_id FROM new_entries)
     GROUP BY e.transaction_id
    HAVING SUM(e.amount) <> 0
     LIMIT 1;
    IF unbalanced IS NOT NULL THEN
        RAISE EXCEPTION 'ledger transaction % does not balance (sum %)', unbalanced, total;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER billing_ledgerentry_balanced_statement
    AFTER INSERT ON billing_ledgerentry
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION billing_check_balanced_statement();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS billing_ledgerentry_balanced_statement ON billing_ledgerentry;
DROP FUNCTION IF EXISTS billing_check_balanced_statement();

CREATE OR REPLACE FUNCTION billing_check_balanced() RETURNS trigger AS $$
DECLARE
    total numeric;
BEGIN
    SELECT COALESCE(SUM(amount), 0) INTO total
      FROM billing_ledgerentry WHERE transaction_id = NEW.transaction_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'ledger transaction % does not balance (sum %)', NEW.transaction_id, total;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER billing_ledgerentry_balanced
    AFTER INSERT ON billing_ledgerentry
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION billing_check_balanced();
"""


class Migration(migrations.Migration):
    dependencies = [("billing", "0003_payments")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
