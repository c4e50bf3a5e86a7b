"""Cross-cloud migration between providers whose hypervisors cannot live-migrate to each other, by
migration agents in the guests (issue 15; US20170371696). See README "Cross-cloud migration"."""
from .criterion import CutoverCosts, Decision, RoundRecord, SwitchoverCriterion, Verdict
from .errors import (CredentialsError, CrossCloudError, CutoverRefusedError, NativeMigrationRefusedError,
                     NoAgentChannelError, NoCapacityError, UnknownProviderError, VerificationError)
from .profiles import PROFILE_A, PROFILE_B, ProviderProfile, check_native_migration, native_blockers

__all__ = ["CutoverCosts", "Decision", "RoundRecord", "SwitchoverCriterion", "Verdict", "CredentialsError",
           "CrossCloudError", "CutoverRefusedError", "NativeMigrationRefusedError", "NoAgentChannelError",
           "NoCapacityError", "UnknownProviderError", "VerificationError", "PROFILE_A", "PROFILE_B",
           "ProviderProfile", "check_native_migration", "native_blockers"]
