"""The gateway's per-request settings (``routing.gateway.conf.hot``) follow overrides."""

from __future__ import annotations

import pytest
from django.conf import settings as django_settings
from django.test import override_settings

from routing.gateway.conf import hot


def test_a_kept_setting_follows_an_override_at_once(settings):
    original = django_settings.GATEWAY_MAX_MESSAGES
    assert original == hot.GATEWAY_MAX_MESSAGES  # read and kept
    settings.GATEWAY_MAX_MESSAGES = original + 7
    assert original + 7 == hot.GATEWAY_MAX_MESSAGES
    with override_settings(GATEWAY_MAX_MESSAGES=3):
        assert hot.GATEWAY_MAX_MESSAGES == 3
    assert original + 7 == hot.GATEWAY_MAX_MESSAGES


def test_only_settings_are_read_through():
    with pytest.raises(AttributeError):
        hot.GATEWAY_NO_SUCH_SETTING  # noqa: B018
    with pytest.raises(AttributeError):
        hot.lowercase  # noqa: B018
