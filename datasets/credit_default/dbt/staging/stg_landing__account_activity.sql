{{ staged_activity(source('landing', 'landed_activity'), 'landed_activity', 'landing') }}
