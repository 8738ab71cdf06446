with

holders as (
    select * from {{ ref('stg_generator__account_holders') }}
),

final as (
    select
        account_id,
        opened_date,
        age,
        {{ age_band('age') }} as age_band,
        sex,
        region,
        product,
        credit_limit
    from holders
)

select * from final
