{{ staged_activity(source('generator', 'account_activity'), 'account_activity', 'generator') }}
