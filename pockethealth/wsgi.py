import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pockethealth.settings")
application = get_wsgi_application()

# What loading the project made (apps, models, URL patterns, translations) lives as long
# as the process: kept out of the garbage collector's full passes, which otherwise walk
# all of it again and again while requests make and drop objects by the thousand.
gc.freeze()
