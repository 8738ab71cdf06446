with

source as (
    {{ clean_rows(source('taiwan', 'taiwan_credit_clients'), 'taiwan_credit_clients') }}
),

renamed as (
    select
        cast(client_id as bigint) as client_id,
        cast(limit_bal as double) as limit_bal,
        case sex when '1' then 'M' when '2' then 'F' end as sex,
        cast(education as integer) as education,
        cast(marriage as integer) as marriage,
        cast(age as integer) as age,
        {%- for i in [0, 2, 3, 4, 5, 6] %}
            cast(pay_{{ i }} as integer) as pay_{{ i }},
        {%- endfor %}
        {%- for i in range(1, 7) %}
            cast(bill_amt{{ i }} as double) as bill_amt{{ i }},
            cast(pay_amt{{ i }} as double) as pay_amt{{ i }},
        {%- endfor %}
        cast(default_payment as bigint) as defaulted
    from source
)

select * from renamed
