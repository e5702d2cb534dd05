import pytest
from io import StringIO
from django.core.management import call_command
@pytest.mark.django_db
def test_show(facility):
    out = StringIO()
    call_command("demo_studies", "--ct-slices", "2", "--testdata", stdout=out, verbosity=2)
    print("\n" + out.getvalue())
