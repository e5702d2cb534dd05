"""On PostgreSQL the database itself refuses to change or remove an audit event, so the
trail stays append-only even for code that bypasses the ORM."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION pockethealth_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER pockethealth_auditevent_append_only
    BEFORE UPDATE OR DELETE ON pockethealth_auditevent
    FOR EACH ROW EXECUTE FUNCTION pockethealth_audit_append_only();
"""

DROP = """
DROP TRIGGER IF EXISTS pockethealth_auditevent_append_only ON pockethealth_auditevent;
DROP FUNCTION IF EXISTS pockethealth_audit_append_only();
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("pockethealth", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards)]
